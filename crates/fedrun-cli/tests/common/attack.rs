//! The process side of the harness for the regression tests of issue #10 ("Hostile network",
//! `tests/attacks.rs`): real `fedrun server` and `fedrun client` processes on loopback, and a
//! measurement of what each attack cost the server process.
//!
//! - [`Federation`] starts `fedrun server` (optionally under a lowered descriptor limit), reads
//!   its address from its first stdout line and starts `fedrun client`s.
//! - [`Proc`] is one child process: reader threads capture its output (a test waits for a line
//!   as an event, with a deadline); a thread waits for its exit and reports it on a channel,
//!   received with a deadline (`recv_timeout`), never polled. Dropping a [`Proc`] kills it by
//!   its pid (`kill -9`), so no process outlives a failed test.
//! - [`Sampler`] reads `/proc/<pid>/status` (VmHWM, VmRSS) and counts `/proc/<pid>/fd` every
//!   [`SAMPLE_PERIOD`]: the peak RSS and peak descriptor count quoted for each attack. Its
//!   period is a measurement rate; nothing waits on it.
//! - The attacker's side, raw connections and the frames, is in
//!   [`super::attacker`].
//!
//! `FEDRUN_ATTACK_BIN=<path>` runs the suite against another `fedrun` binary (one built from an
//! older commit, to see which attacks it falls to); by default it is this crate's binary.

use std::ffi::OsString;
use std::io::{self, ErrorKind, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often the [`Sampler`] reads the server's memory and descriptors.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(20);
/// Deadline for a started server to print its address.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// Deadline for a process's output pipes to close once it has exited.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// Output bytes kept per stream (the rest is only counted): a server that logs megabytes must
/// not make the test hold them all.
const KEPT_OUTPUT: usize = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The `fedrun` binary under test: `FEDRUN_ATTACK_BIN`, else the one cargo built.
fn fedrun_bin() -> OsString {
    std::env::var_os("FEDRUN_ATTACK_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_fedrun").into())
}

/// One output stream of a child process, captured by a reader thread.
pub struct Output {
    state: Mutex<OutputState>,
    changed: Condvar,
}

#[derive(Default)]
struct OutputState {
    kept: Vec<u8>,
    total: u64,
    closed: bool,
}

impl Output {
    fn capture(mut from: impl Read + Send + 'static) -> Arc<Output> {
        let out = Arc::new(Output {
            state: Mutex::default(),
            changed: Condvar::new(),
        });
        let sink = out.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let mut s = lock(&sink.state);
                s.total += n as u64;
                let room = KEPT_OUTPUT.saturating_sub(s.kept.len());
                s.kept.extend_from_slice(&buf[..n.min(room)]);
                drop(s);
                sink.changed.notify_all();
            }
            lock(&sink.state).closed = true;
            sink.changed.notify_all();
        });
        out
    }

    /// What was captured so far (the first [`KEPT_OUTPUT`] bytes), as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.state).kept).into_owned()
    }

    /// Every byte the process wrote to this stream, kept or not.
    pub fn total_bytes(&self) -> u64 {
        lock(&self.state).total
    }

    /// Waits until the captured output contains `needle`; false if the stream closed or
    /// `deadline` passed first.
    pub fn wait_for(&self, needle: &str, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        let mut s = lock(&self.state);
        loop {
            if String::from_utf8_lossy(&s.kept).contains(needle) {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if s.closed || left.is_zero() {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits until the stream is closed (the process exited); false after `deadline`.
    fn wait_closed(&self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        let mut s = lock(&self.state);
        while !s.closed {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// A child process: captured output, exit reported by a waiting thread, killed when dropped.
pub struct Proc {
    name: String,
    pid: u32,
    stdout: Arc<Output>,
    stderr: Arc<Output>,
    exited: mpsc::Receiver<io::Result<ExitStatus>>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `command` with stdin closed and stdout/stderr captured.
    pub fn spawn(name: &str, mut command: Command) -> Proc {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = Output::capture(child.stdout.take().expect("stdout is piped"));
        let stderr = Output::capture(child.stderr.take().expect("stderr is piped"));
        let pid = child.id();
        let (report, exited) = mpsc::channel();
        thread::spawn(move || {
            let _ = report.send(child.wait());
        });
        Proc {
            name: name.to_owned(),
            pid,
            stdout,
            stderr,
            exited,
            status: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its captured stdout.
    pub fn stdout(&self) -> &Output {
        &self.stdout
    }

    /// Its captured stderr.
    pub fn stderr(&self) -> &Output {
        &self.stderr
    }

    fn record(&mut self, result: io::Result<ExitStatus>) -> ExitStatus {
        let status = result.unwrap_or_else(|e| panic!("waiting for {}: {e}", self.name));
        self.status = Some(status);
        // its output is complete once the pipes close
        self.stdout.wait_closed(DRAIN_DEADLINE);
        self.stderr.wait_closed(DRAIN_DEADLINE);
        status
    }

    /// Waits for the process to exit, at most `deadline`; `None` if it is still running.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        match self.exited.recv_timeout(deadline) {
            Ok(result) => Some(self.record(result)),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("the waiter of {} is gone", self.name),
        }
    }

    /// Its exit status if it has exited by now (does not wait).
    pub fn exited_yet(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        match self.exited.try_recv() {
            Ok(result) => Some(self.record(result)),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => panic!("the waiter of {} is gone", self.name),
        }
    }

    /// Sends SIGKILL to the process, by pid, unless its exit was already reported. Its waiter
    /// thread is what reaps it, so the pid stays this process's until then; the only window in
    /// which it could name another process is between that reap and its report, microseconds.
    /// Never panics (it runs in `Drop`, also while a failed test unwinds).
    pub fn kill_9(&mut self) {
        if self.status.is_some() {
            return;
        }
        match self.exited.try_recv() {
            Ok(Ok(status)) => self.status = Some(status),
            Ok(Err(_)) | Err(TryRecvError::Disconnected) => {}
            Err(TryRecvError::Empty) => {
                let _ = Command::new("kill")
                    .args(["-9", &self.pid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    /// "site-1: exit status: 1 / stderr …", for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "{} (pid {}): {:?}\n--- stderr ---\n{}",
            self.name,
            self.pid,
            self.status,
            tail(&self.stderr.text(), 6000)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// The last `max` bytes of `s` (at a character boundary).
fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// What the [`Sampler`] saw of a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// RSS at the first sample (the server idle, listening), KiB.
    pub baseline_rss_kib: u64,
    /// The highest VmHWM (the kernel's peak RSS) or VmRSS read, KiB.
    pub peak_rss_kib: u64,
    /// The most open descriptors counted at one sample.
    pub peak_fds: usize,
    /// Number of samples taken.
    pub samples: usize,
}

impl Usage {
    /// Peak RSS above the baseline, KiB.
    pub fn rss_growth_kib(&self) -> u64 {
        self.peak_rss_kib.saturating_sub(self.baseline_rss_kib)
    }
}

/// Samples a process's memory and descriptors every [`SAMPLE_PERIOD`] until stopped or gone.
pub struct Sampler {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<Usage>,
}

/// `(VmHWM, VmRSS)` in KiB, `None` once the process is gone (or a zombie: no memory lines).
fn read_memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

fn count_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

impl Sampler {
    /// Starts sampling `pid` now; the first sample is the baseline.
    pub fn start(pid: u32) -> Sampler {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::spawn(move || {
            let mut usage = Usage::default();
            while let Some((hwm, rss)) = read_memory(pid) {
                if usage.samples == 0 {
                    usage.baseline_rss_kib = rss;
                }
                usage.peak_rss_kib = usage.peak_rss_kib.max(hwm).max(rss);
                usage.peak_fds = usage.peak_fds.max(count_fds(pid));
                usage.samples += 1;
                match stopped.recv_timeout(SAMPLE_PERIOD) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            usage
        });
        Sampler { stop, thread }
    }

    /// Stops sampling and returns what was seen.
    pub fn finish(self) -> Usage {
        let _ = self.stop.send(());
        self.thread
            .join()
            .expect("the sampler thread does not panic")
    }
}

/// How to start `fedrun server` (always the built-in logistic-regression job).
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// `--rounds`.
    pub rounds: u64,
    /// `--timeout` in seconds.
    pub timeout_secs: u64,
    /// `--poll-interval-ms`.
    pub poll_interval_ms: u64,
    /// `--client-grace` in seconds, if given.
    pub client_grace_secs: Option<u64>,
    /// A soft and hard `RLIMIT_NOFILE` for the server (`ulimit -n` in a shell that then execs
    /// it, so that the pid is the server's).
    pub fd_limit: Option<u32>,
}

impl Default for ServerSpec {
    fn default() -> Self {
        ServerSpec {
            rounds: 2,
            timeout_secs: 60,
            poll_interval_ms: 20,
            client_grace_secs: None,
            fd_limit: None,
        }
    }
}

/// A running `fedrun server` for `site-1,site-2`, its address, job and workspace, sampled from
/// the moment it listens.
pub struct Federation {
    /// The server process.
    pub server: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    /// `tcp://<addr>`.
    pub url: String,
    /// The job id.
    pub job_id: String,
    /// Its workspace (removed when the federation is dropped).
    pub workspace: PathBuf,
    sampler: Option<Sampler>,
}

impl Federation {
    /// Starts the server and waits (with a deadline) for its `listening …` line; panics if it
    /// does not print one.
    pub fn start(spec: &ServerSpec) -> Federation {
        Federation::try_start(spec).unwrap_or_else(|why| panic!("{why}"))
    }

    /// [`Federation::start`], with the reason as an error when the server printed no address
    /// (e.g. it refused an option and exited).
    pub fn try_start(spec: &ServerSpec) -> Result<Federation, String> {
        let job_id = format!("attack-{}", uuid::Uuid::new_v4());
        let workspace = std::env::temp_dir().join(format!("fedrun-{job_id}"));
        let mut args: Vec<String> = [
            "server",
            "--listen",
            "127.0.0.1:0",
            "--clients",
            "site-1,site-2",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend([
            "--rounds".to_owned(),
            spec.rounds.to_string(),
            "--job-id".to_owned(),
            job_id.clone(),
            "--workspace".to_owned(),
            workspace.to_string_lossy().into_owned(),
            "--timeout".to_owned(),
            spec.timeout_secs.to_string(),
            "--poll-interval-ms".to_owned(),
            spec.poll_interval_ms.to_string(),
        ]);
        if let Some(grace) = spec.client_grace_secs {
            args.extend(["--client-grace".to_owned(), grace.to_string()]);
        }
        let mut command = match spec.fd_limit {
            None => Command::new(fedrun_bin()),
            Some(limit) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", "ulimit -n \"$1\" && shift && exec \"$@\"", "sh"])
                    .arg(limit.to_string())
                    .arg(fedrun_bin());
                sh
            }
        };
        command.args(&args).env("RUST_LOG", "info");
        let mut server = Proc::spawn("fedrun server", command);
        if !server.stdout().wait_for("\n", START_DEADLINE) {
            server.kill_9();
            server.wait_exit(DRAIN_DEADLINE);
            return Err(format!(
                "the server printed no address within {START_DEADLINE:?}\n{}",
                server.describe()
            ));
        }
        let first = server
            .stdout()
            .text()
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        let url = first
            .strip_prefix("listening ")
            .and_then(|rest| rest.strip_suffix(&format!(" job {job_id}")))
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_owned();
        let addr: SocketAddr = url
            .strip_prefix("tcp://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("not a tcp:// address: {url}"));
        let sampler = Some(Sampler::start(server.pid()));
        Ok(Federation {
            server,
            addr,
            url,
            job_id,
            workspace,
            sampler,
        })
    }

    /// Starts `fedrun client` for `site` (info logs: tests wait for its task lines).
    pub fn client(&self, site: &str, timeout_secs: u64) -> Proc {
        let mut command = Command::new(fedrun_bin());
        command
            .args(["client", "--server", &self.url, "--name", site])
            .args(["--job-id", &self.job_id])
            .args(["--timeout", &timeout_secs.to_string()])
            .env("RUST_LOG", "info");
        Proc::spawn(&format!("fedrun client {site}"), command)
    }

    /// `<cell>.<job>`: a job cell of this run (`server.<job>`, `site-1.<job>`).
    pub fn job_cell(&self, cell: &str) -> String {
        format!("{cell}.{}", self.job_id)
    }

    /// Stops sampling (call it once the server has exited) and returns what was seen.
    pub fn usage(&mut self) -> Usage {
        self.sampler.take().map(Sampler::finish).unwrap_or_default()
    }

    /// The server's `metrics.json` (written when the run ends), if it can be read.
    pub fn metrics(&self) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.workspace.join("metrics.json")).ok()?;
        serde_json::from_str(&text).ok()
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        self.server.kill_9();
        let _ = std::fs::remove_dir_all(&self.workspace);
    }
}
