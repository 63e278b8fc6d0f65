//! The Python side of the live NVFlare tests, as the Rust tests see it: `nvflare_cells.py` run
//! as a child process, its JSON events read from stdout, its JSON commands written to stdin.
//!
//! Shared by `tests/nvflare_interop.rs` and `tests/nvflare_download.rs` (included with
//! `#[path]`), so that both kill the process the same way and report the same evidence on
//! failure: every event received and the tail of NVFlare's stderr. Every wait has a deadline.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value as Json};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// The variable naming the Python interpreter that has `nvflare==2.9.0`.
pub const PYTHON_ENV: &str = "FEDRUN_NVFLARE_PYTHON";
/// The Python side of the tests.
pub const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/nvflare_cells.py"
);
/// The deadline of one step (a reply, an event).
pub const STEP: Duration = Duration::from_secs(15);
/// The deadline for the Python cells to come up (importing NVFlare takes a few seconds).
pub const STARTUP: Duration = Duration::from_secs(40);

/// How to start the script.
pub struct PyArgs<'a> {
    /// The interpreter.
    pub python: &'a str,
    /// The port of the server root cell.
    pub port: u16,
    /// The job of the server job cell `server.<job>`.
    pub job: &'a str,
    /// The script ends itself after this many seconds.
    pub watchdog_secs: u64,
    /// More arguments (e.g. `--np-download`).
    pub extra: &'a [&'a str],
}

/// The running Python script: its stdin, its events, and a guard that kills it by pid in Drop.
pub struct PyCells {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::UnboundedReceiver<Json>,
    /// Events received but not consumed yet, with their arrival number.
    backlog: VecDeque<(usize, Json)>,
    /// Every event received, for the failure report.
    received: Vec<Json>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    next_id: u64,
}

impl PyCells {
    /// Starts the script and waits for its `ready` event.
    pub async fn start(args: PyArgs<'_>) -> PyCells {
        PyCells::start_script(SCRIPT, args).await
    }

    /// [`PyCells::start`] with another script of the same protocol (`--port`, `--job`,
    /// `--watchdog`, JSON events and commands).
    pub async fn start_script(script: &str, args: PyArgs<'_>) -> PyCells {
        let python = args.python;
        let mut child = Command::new(python)
            .arg(script)
            .args(["--port", &args.port.to_string(), "--job", args.job])
            .args(["--watchdog", &args.watchdog_secs.to_string()])
            .args(args.extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {python} {script}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let stdin = child.stdin.take();

        let (tx, events) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str::<Json>(&line)
                    .unwrap_or_else(|_| json!({"event": "not_json", "text": line}));
                if tx.send(event).is_err() {
                    return;
                }
            }
            let _ = tx.send(json!({"event": "eof"}));
        });
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = Arc::clone(&stderr_tail);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                if tail.len() == 300 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });

        let mut py = PyCells {
            child,
            stdin,
            events,
            backlog: VecDeque::new(),
            received: Vec::new(),
            stderr_tail,
            next_id: 0,
        };
        let ready = py.wait_event_for("ready", STARTUP, |_| true).await;
        assert_eq!(ready.1["job"], format!("server.{}", args.job));
        py
    }

    /// The first event named `name` for which `pred` holds (looking at unconsumed events
    /// first), with its arrival number; panics after `STEP`.
    pub async fn wait_event(&mut self, name: &str, pred: impl Fn(&Json) -> bool) -> (usize, Json) {
        self.wait_event_for(name, STEP, pred).await
    }

    /// [`PyCells::wait_event`] with its own deadline.
    pub async fn wait_event_for(
        &mut self,
        name: &str,
        deadline: Duration,
        pred: impl Fn(&Json) -> bool,
    ) -> (usize, Json) {
        self.wait_matching(name, deadline, |e| e["event"] == name && pred(e))
            .await
    }

    /// The first event for which `matches` holds; `what` names it in the failure message.
    pub async fn wait_matching(
        &mut self,
        what: &str,
        deadline: Duration,
        matches: impl Fn(&Json) -> bool,
    ) -> (usize, Json) {
        if let Some(pos) = self.backlog.iter().position(|(_, e)| matches(e)) {
            return self.backlog.remove(pos).unwrap();
        }
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let event = match tokio::time::timeout_at(until, self.events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => panic!("the Python script's output ended while waiting for {what}"),
                Err(_) => panic!("no '{what}' event from the Python script within {deadline:?}"),
            };
            let n = self.received.len();
            self.received.push(event.clone());
            if event["event"] == "eof" || event["event"] == "watchdog" {
                panic!("the Python script ended ({event}) while waiting for {what}");
            }
            if matches(&event) {
                return (n, event);
            }
            self.backlog.push_back((n, event));
        }
    }

    /// Takes every unconsumed event named `name` that arrived so far (the backlog plus what is
    /// already queued), without waiting.
    pub fn drain(&mut self, name: &str) -> Vec<Json> {
        while let Ok(event) = self.events.try_recv() {
            let n = self.received.len();
            self.received.push(event.clone());
            self.backlog.push_back((n, event));
        }
        let (taken, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.backlog)
            .into_iter()
            .partition(|(_, e)| e["event"] == name);
        self.backlog = kept;
        taken.into_iter().map(|(_, e)| e).collect()
    }

    /// Sends one command and returns its `done` event; a `failed` event fails the test.
    pub async fn command(&mut self, cmd: Json) -> Json {
        self.command_for(cmd, STEP).await
    }

    /// [`PyCells::command`] with its own deadline.
    pub async fn command_for(&mut self, mut cmd: Json, deadline: Duration) -> Json {
        self.next_id += 1;
        let id = self.next_id;
        cmd["id"] = json!(id);
        let line = format!("{cmd}\n");
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
        let (_, event) = self
            .wait_matching(&format!("done {id}"), deadline, |e| {
                e["id"] == id && (e["event"] == "done" || e["event"] == "failed")
            })
            .await;
        assert_eq!(event["event"], "done", "command {cmd} failed: {event}");
        event
    }

    /// Asks the script to stop its cells, and waits for it to exit (killing it if it does not).
    pub async fn quit(mut self) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin.write_all(b"{\"cmd\": \"quit\"}\n").unwrap();
        stdin.flush().unwrap();
        self.wait_event("stopped", |_| true).await;
        // the script exits right after "stopped": its stdout ends with the process
        let eof = timeout(STEP, async {
            loop {
                match self.events.recv().await {
                    Some(e) if e["event"] == "eof" => return,
                    Some(e) => self.received.push(e),
                    None => return,
                }
            }
        })
        .await;
        assert!(
            eof.is_ok(),
            "the Python script did not exit after 'stopped'"
        );
        // stdout closed by the exit: wait() returns at once
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the Python script exited with {status}");
    }
}

impl Drop for PyCells {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // by pid: only the process this test started
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- events from the Python script:");
            for e in &self.received {
                eprintln!("{e}");
            }
            eprintln!("---- last lines of its stderr:");
            let tail = self.stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
            for line in tail.iter() {
                eprintln!("{line}");
            }
        }
    }
}

/// A port of 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
