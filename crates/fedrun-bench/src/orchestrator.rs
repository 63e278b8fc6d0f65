//! The `run` role: starts one OS process per cell (this same binary, re-executed with `cell`),
//! lets the active one measure, reads every child's peak RSS from `/proc/<pid>/status`, stops
//! the children by pid with deadlines, and writes `<tag>.json` in the NVFlare harness's format
//! (every run, plus median/min/max of the key figures), so one report reads both.
//!
//! A run, step by step: start `server` (port 0) and wait for its `READY` (which names the port);
//! start the sites and wait for all their `READY`s; write `GO` to the active child; wait for its
//! `RESULT` (or `ERROR`, or its exit) within `deadline + 90 s`; read `VmHWM` of every child;
//! close every child's stdin (they exit), wait up to 10 s each, then kill the ones still there.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use crate::args::{Options, Scenario};
use crate::error::BenchError;
use crate::measure::{epoch_secs, summarize, Memory, MIB};

/// How long a child may take to print `READY`.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a child may take to exit once its stdin is closed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for a child to exit.
const EXIT_POLL: Duration = Duration::from_millis(10);
/// Lines of a child's stderr kept for error reports.
const STDERR_TAIL: usize = 20;

/// A protocol line from a child, or the end of its stdout.
enum Event {
    Line {
        child: usize,
        tag: String,
        body: Json,
    },
    Closed {
        child: usize,
    },
}

/// One child process.
struct ChildProc {
    name: String,
    process: Child,
    stdin: Option<ChildStdin>,
    ready: Option<Json>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl ChildProc {
    fn spawn(
        index: usize,
        name: &str,
        args: Vec<String>,
        events: mpsc::Sender<Event>,
    ) -> Result<ChildProc, BenchError> {
        let exe = std::env::current_exe()?;
        let mut process = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdin = process.stdin.take();
        let stdout = process.stdout.take();
        let stderr_pipe = process.stderr.take();
        if let Some(out) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let Some((tag, body)) = line.split_once(' ') else {
                        continue;
                    };
                    if !matches!(tag, "READY" | "RESULT" | "ERROR") {
                        continue;
                    }
                    let body = serde_json::from_str(body)
                        .unwrap_or_else(|e| json!({"error": format!("bad {tag} line: {e}")}));
                    let tag = tag.to_owned();
                    if events
                        .send(Event::Line {
                            child: index,
                            tag,
                            body,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                // The orchestrator may have finished already: nobody to tell then.
                let _ = events.send(Event::Closed { child: index });
            });
        }
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(err) = stderr_pipe {
            let tail = Arc::clone(&stderr);
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    let mut t = tail.lock().unwrap_or_else(PoisonError::into_inner);
                    if t.len() == STDERR_TAIL {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }
        Ok(ChildProc {
            name: name.to_owned(),
            process,
            stdin,
            ready: None,
            stderr,
        })
    }

    fn stderr_tail(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    fn failure(&self, reason: impl Into<String>) -> BenchError {
        BenchError::Child {
            name: self.name.clone(),
            reason: format!("{}; stderr: {:?}", reason.into(), self.stderr_tail()),
        }
    }

    /// Closes stdin (the child exits), waits up to [`STOP_TIMEOUT`], then kills it by pid.
    fn stop(&mut self) {
        drop(self.stdin.take());
        let until = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.process.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < until => std::thread::sleep(EXIT_POLL),
                _ => break,
            }
        }
        log::warn!(
            "{} (pid {}) did not exit within {STOP_TIMEOUT:?}: killing it",
            self.name,
            self.process.id()
        );
        if let Err(e) = self.process.kill() {
            log::warn!("cannot kill {}: {e}", self.name);
        }
        // Reap it; a kill cannot be refused, so this returns promptly.
        let _ = self.process.wait();
    }
}

/// Waits for a line with `tag` from child `want` (or an `ERROR` from it, or its exit).
fn wait_line(
    events: &mpsc::Receiver<Event>,
    children: &mut [ChildProc],
    want: usize,
    tag: &str,
    until: Instant,
) -> Result<Json, BenchError> {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let event = match events.recv_timeout(left) {
            Ok(e) => e,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let name = children.get(want).map_or("?", |c| c.name.as_str());
                return Err(BenchError::Timeout(format!("no {tag} from {name}")));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(BenchError::Scenario("every child closed its output".into()))
            }
        };
        match event {
            Event::Line {
                child,
                tag: t,
                body,
            } => {
                if t == "READY" {
                    if let Some(c) = children.get_mut(child) {
                        c.ready = Some(body.clone());
                    }
                }
                if t == "ERROR" {
                    let c = children.get(child);
                    return Err(c.map_or_else(
                        || BenchError::Scenario(body.to_string()),
                        |c| c.failure(body.to_string()),
                    ));
                }
                if child == want && t == tag {
                    return Ok(body);
                }
            }
            Event::Closed { child } => {
                if let Some(c) = children.get_mut(child) {
                    let status = c.process.try_wait().ok().flatten();
                    return Err(c.failure(format!("exited early ({status:?})")));
                }
            }
        }
    }
}

/// Starts the processes of one run and waits for the active side's result.
fn drive(
    opts: &Options,
    children: &mut Vec<ChildProc>,
    events_tx: &mpsc::Sender<Event>,
    events: &mpsc::Receiver<Event>,
) -> Result<Json, BenchError> {
    let sites = opts.sites();
    let server_active = opts.scenario == Scenario::Multicast;
    let server_args = opts.child_args("server", 0, server_active, sites);
    children.push(ChildProc::spawn(
        0,
        "server",
        server_args,
        events_tx.clone(),
    )?);
    let ready = wait_line(events, children, 0, "READY", Instant::now() + READY_TIMEOUT)?;
    let port = ready
        .get("port")
        .and_then(Json::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| BenchError::Scenario(format!("server READY without a port: {ready}")))?;
    for i in 1..=sites {
        let name = format!("site-{i}");
        let active = !server_active && i == 1;
        let args = opts.child_args(&name, port, active, sites);
        children.push(ChildProc::spawn(i, &name, args, events_tx.clone())?);
    }
    let until = Instant::now() + READY_TIMEOUT;
    for i in 1..=sites {
        if children.get(i).is_some_and(|c| c.ready.is_none()) {
            wait_line(events, children, i, "READY", until)?;
        }
    }
    let active = if server_active { 0 } else { 1 };
    let child = children
        .get_mut(active)
        .ok_or_else(|| BenchError::Scenario("no active child".into()))?;
    let stdin = child
        .stdin
        .as_mut()
        .ok_or_else(|| BenchError::Scenario("the active child has no stdin".into()))?;
    stdin.write_all(b"GO\n")?;
    stdin.flush()?;
    let until = Instant::now() + opts.deadline + Duration::from_secs(90);
    wait_line(events, children, active, "RESULT", until)
}

/// One run: fresh processes, the active side's result, every child's memory.
fn one_run(opts: &Options, run: usize) -> Json {
    let (tx, rx) = mpsc::channel();
    let mut children = Vec::new();
    let outcome = drive(opts, &mut children, &tx, &rx);
    let mut result = match outcome {
        Ok(r) => r,
        Err(e) => json!({"error": e.to_string()}),
    };
    let mut rss = serde_json::Map::new();
    for c in &children {
        let mem = Memory::of(Some(c.process.id()));
        let ready_rss = c.ready.as_ref().and_then(|r| r.get("VmRSS")).cloned();
        rss.insert(
            c.name.clone(),
            json!({"ready_rss": ready_rss, "hwm": mem.hwm}),
        );
    }
    for c in children.iter_mut().rev() {
        c.stop();
    }
    if let Json::Object(m) = &mut result {
        m.insert("rss".into(), Json::Object(rss));
        m.insert("run".into(), json!(run));
    }
    result
}

/// The key figures summarised over runs, per scenario (as `cellbench.py`).
fn summary_keys(s: Scenario) -> &'static [&'static str] {
    match s {
        Scenario::Latency => &["p50_us", "p99_us", "mean_us", "seq_rps"],
        Scenario::Throughput => &["rps", "p50_us", "p99_us"],
        Scenario::Multicast => &["p50_us", "p99_us", "mean_us"],
        Scenario::Large => &["mib_s", "median_s"],
        Scenario::Ff => &["e2e_rate", "send_rate"],
    }
}

fn rss_values(runs: &[&Json], who: &str, field: &str) -> Vec<f64> {
    runs.iter()
        .filter_map(|r| r.get("rss")?.get(who)?.get(field)?.as_f64())
        .map(|b| b / MIB)
        .collect()
}

/// The summary object of a results file.
pub fn summarize_runs(scenario: Scenario, runs: &[Json]) -> Json {
    let good: Vec<&Json> = runs.iter().filter(|r| r.get("error").is_none()).collect();
    let mut summary = serde_json::Map::new();
    for key in summary_keys(scenario) {
        let vals: Vec<f64> = good.iter().filter_map(|r| r.get(*key)?.as_f64()).collect();
        summary.insert((*key).to_owned(), summarize(&vals));
    }
    if scenario == Scenario::Large {
        for who in ["site-1", "server"] {
            let peak = rss_values(&good, who, "hwm");
            let idle = rss_values(&good, who, "ready_rss");
            if !peak.is_empty() {
                summary.insert(format!("{who}_peak_rss_mib"), summarize(&peak));
            }
            if !idle.is_empty() {
                summary.insert(format!("{who}_idle_rss_mib"), summarize(&idle));
            }
        }
    }
    Json::Object(summary)
}

fn read_json(path: &Path) -> Result<Json, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|source| BenchError::File {
        path: path.to_owned(),
        source,
    })?;
    Ok(serde_json::from_str(&text)?)
}

/// The `run` role: `opts.runs` runs, then `<results_dir>/<tag>.json` and a `SUMMARY` line.
///
/// # Errors
///
/// The results file cannot be read (with `--append`) or written. A failed run is not an error:
/// it is recorded with its `error` and left out of the summary.
pub fn run_orchestrator(opts: &Options) -> Result<Json, BenchError> {
    std::fs::create_dir_all(&opts.results_dir).map_err(|source| BenchError::File {
        path: opts.results_dir.clone(),
        source,
    })?;
    let tag = opts.tag();
    let path: PathBuf = opts.results_dir.join(format!("{tag}.json"));
    let mut runs: Vec<Json> = Vec::new();
    if opts.append && path.exists() {
        if let Some(old) = read_json(&path)?.get("runs").and_then(Json::as_array) {
            runs.extend(old.iter().cloned());
        }
    }
    for _ in 0..opts.runs {
        let index = runs.len();
        let r = one_run(opts, index);
        eprintln!("[{tag}] run {index}: {r}");
        crate::node::emit("RESULT", &r);
        runs.push(r);
    }
    let errors = runs.iter().filter(|r| r.get("error").is_some()).count();
    let summary = summarize_runs(opts.scenario, &runs);
    let out = json!({
        "tag": tag,
        "impl": "fedrun",
        "args": {
            "scenario": opts.scenario.as_str(),
            "path": opts.path.as_str(),
            "count": opts.count,
            "warmup": opts.warmup,
            "concurrency": opts.concurrency,
            "clients": opts.clients,
            "size_mib": opts.size_mib,
            "source": opts.source.as_str(),
        },
        "errors": errors,
        "summary": summary,
        "runs": runs,
        "when": epoch_secs(),
    });
    let text = serde_json::to_string_pretty(&out)?;
    std::fs::write(&path, text).map_err(|source| BenchError::File {
        path: path.clone(),
        source,
    })?;
    let mut line = json!({"tag": tag, "errors": errors});
    if let (Json::Object(l), Some(Json::Object(s))) = (&mut line, out.get("summary")) {
        l.extend(s.clone());
    }
    crate::node::emit("SUMMARY", &line);
    Ok(out)
}
