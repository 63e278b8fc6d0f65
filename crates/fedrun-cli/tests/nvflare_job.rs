//! `fedrun job` as site-1's client job in a real NVIDIA FLARE 2.9.0 POC.
//!
//! This is the acceptance test of `fedrun job`: NVFlare's own server and client parents, its
//! admin API and a hello-numpy ScatterAndGather job, with site-1's client job run by fedrun
//! through fedrun's site launcher (`crates/fedrun-cli/nvflare/fedrun_launcher.py`) and site-2's
//! by NVFlare's Python worker. The Python harness `tests/e2e/nvflare_poc.py` builds the POC in a
//! scratch directory, runs one scenario, checks the outcome (job status, both CPs report RC 0,
//! the server accepted every site's result in every round, the final model is exact, or for the
//! abort the job ends ABORTED and the CJ exits 0 by itself) and prints one JSON line, which this
//! test reads and asserts on.
//!
//! Scenarios: (a) clear tcp kit, task arrays as download references (NVFlare's default);
//! (b) the same with `np_download_chunk_size=0` (arrays inline); (c) abort while a task runs;
//! (d) the kit as `nvflare poc prepare` makes it (http + mTLS), where the CJ can only reach the
//! server through its parent; (e) NVFlare's numpy cross-site validation job (hello-numpy-cross-val:
//! ScatterAndGather, then CrossSiteModelEval with NPTrainer answering `submit_model` and
//! NPValidator answering `validate`) on the clear tcp kit, where site-1 must validate the server's
//! and site-2's models and site-2 must validate the model site-1 submitted.
//!
//! Needs `FEDRUN_NVFLARE_PYTHON` (a Python with nvflare 2.9.0, as `tests/nvflare_interop.rs`);
//! without it every test prints a SKIP notice and passes. The CJ command is `<fedrun> job`;
//! `FEDRUN_E2E_CJ_COMMAND` replaces it (e.g. `$PWD/tests/e2e/stock_worker.sh`, NVFlare's own
//! worker behind the launcher, which validates the harness).
//!
//! The scenarios run one at a time (a lock), each POC on its own free port and scratch dir. The
//! harness kills every process it started (and the jobs NVFlare spawned) when it ends; if it
//! overruns its deadline, this test sends it SIGTERM (its cleanup handler runs) and then kills it
//! by pid.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// The variable naming the Python interpreter that has `nvflare==2.9.0`.
const PYTHON_ENV: &str = "FEDRUN_NVFLARE_PYTHON";
/// The variable that replaces site-1's CJ command (program + args, program an absolute path).
const CJ_COMMAND_ENV: &str = "FEDRUN_E2E_CJ_COMMAND";
/// The harness's own deadline for one scenario (seconds).
const SCENARIO_SECS: u64 = 60;
/// How long this test waits for the harness before stopping it (its deadline plus cleanup).
const HARNESS_DEADLINE: Duration = Duration::from_secs(SCENARIO_SECS + 30);
/// How long the harness gets to clean up after SIGTERM before it is killed.
const CLEANUP_GRACE: Duration = Duration::from_secs(10);

/// One POC at a time: each runs a server, two CPs and their jobs on a shared 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn harness_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/e2e/nvflare_poc.py")
}

/// Site-1's CJ command: `FEDRUN_E2E_CJ_COMMAND`, else `<fedrun> job`.
fn cj_command() -> String {
    if let Ok(cmd) = std::env::var(CJ_COMMAND_ENV) {
        if !cmd.trim().is_empty() {
            return cmd;
        }
    }
    let fedrun = env!("CARGO_BIN_EXE_fedrun");
    format!("{fedrun} job")
}

/// The harness process; stopped (SIGTERM, then SIGKILL by pid) if still running when dropped.
/// A thread waits for its exit, so every wait here is on that event, with a deadline.
struct Harness {
    pid: u32,
    exited: mpsc::Receiver<std::process::ExitStatus>,
    status: Option<std::process::ExitStatus>,
}

impl Harness {
    /// Starts watching `child` (its stdout and stderr already taken).
    fn watch(mut child: Child) -> Harness {
        let pid = child.id();
        let (tx, exited) = mpsc::channel();
        thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = tx.send(status);
            }
        });
        Harness {
            pid,
            exited,
            status: None,
        }
    }

    /// Waits up to `deadline` for the exit.
    fn wait(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        if self.status.is_none() {
            self.status = self.exited.recv_timeout(deadline).ok();
        }
        self.status
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.pid.to_string()])
            .status();
    }

    fn stop(&mut self) {
        if self.wait(Duration::ZERO).is_some() {
            return;
        }
        // SIGTERM lets the harness kill its process groups; std only offers SIGKILL.
        self.signal("-TERM");
        if self.wait(CLEANUP_GRACE).is_none() {
            self.signal("-KILL");
            let _ = self.wait(CLEANUP_GRACE);
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs one scenario and returns the harness's JSON result, or `None` when skipped.
fn run_scenario(label: &str, args: &[&str]) -> Option<Json> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Ok(python) = std::env::var(PYTHON_ENV) else {
        eprintln!(
            "SKIP nvflare_job {label}: {PYTHON_ENV} is not set (a Python with nvflare 2.9.0)"
        );
        return None;
    };
    let cj = cj_command();
    let mut cmd = Command::new(&python);
    cmd.arg(harness_path())
        .args(args)
        .args(["--cj-command", &cj, "--timeout", &SCENARIO_SECS.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Ok(level) = std::env::var("RUST_LOG") {
        cmd.args(["--cj-env", &format!("RUST_LOG={level}")]);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("start the harness");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let mut harness = Harness::watch(child);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        let _ = tx.send(out);
    });
    let err_reader = thread::spawn(move || {
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        err
    });
    let out = match rx.recv_timeout(HARNESS_DEADLINE) {
        Ok(out) => out,
        Err(_) => {
            harness.stop();
            panic!("{label}: the harness did not finish within {HARNESS_DEADLINE:?}");
        }
    };
    // stdout closed: the harness is ending
    let status = harness
        .wait(CLEANUP_GRACE)
        .expect("the harness exits after closing its stdout");
    let err = err_reader.join().unwrap_or_default();
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| {
            panic!("{label}: no JSON line from the harness ({status}); stdout:\n{out}\nstderr tail:\n{}", tail(&err))
        });
    let result: Json = serde_json::from_str(line).expect("the harness's JSON line");
    eprintln!(
        "nvflare_job {label}: {} in {:.1} s; timings {}",
        result["result"],
        started.elapsed().as_secs_f64(),
        result["timings"]
    );
    assert_eq!(
        result["result"],
        "PASS",
        "{label}: harness failed ({status}); errors {}; scratch dir kept at {}\nstderr tail:\n{}",
        result["errors"],
        result["kept_dir"],
        tail(&err)
    );
    assert!(
        status.success(),
        "{label}: PASS but harness exit status {status}"
    );
    Some(result)
}

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(4000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

/// Site-1's CJ ended by itself with exit status 0 and the CP reported RC 0 for both sites.
fn assert_clean_exits(label: &str, result: &Json) {
    assert_eq!(
        result["cj_rc"]["site-1"], 0,
        "{label}: site-1 RC {}",
        result["cj_rc"]
    );
    assert_eq!(
        result["cj_rc"]["site-2"], 0,
        "{label}: site-2 RC {}",
        result["cj_rc"]
    );
}

/// The job completed, every site's result was accepted in both rounds, and the final global
/// model is the initial one plus one per round.
fn assert_completed(label: &str, result: &Json) {
    assert_eq!(result["status"], "FINISHED:COMPLETED", "{label}");
    assert_clean_exits(label, result);
    let accepted: Vec<&str> = result["accepted"]
        .as_array()
        .expect("accepted list")
        .iter()
        .filter_map(Json::as_str)
        .collect();
    assert_eq!(
        accepted,
        ["site-1@0", "site-1@1", "site-2@0", "site-2@1"],
        "{label}"
    );
    assert_eq!(
        result["model"],
        serde_json::json!([[3.0, 4.0, 5.0], [6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]),
        "{label}"
    );
}

#[test]
fn job_completes_with_download_refs_on_a_clear_tcp_kit() {
    let label = "(a) clear tcp, download refs";
    if let Some(r) = run_scenario(label, &["--mode", "clear", "--scenario", "complete"]) {
        assert_completed(label, &r);
    }
}

#[test]
fn job_completes_with_inline_arrays_on_a_clear_tcp_kit() {
    let label = "(b) clear tcp, np_download_chunk_size=0";
    let args = [
        "--mode",
        "clear",
        "--scenario",
        "complete",
        "--np-download-chunk-size",
        "0",
    ];
    if let Some(r) = run_scenario(label, &args) {
        assert_completed(label, &r);
    }
}

#[test]
fn aborted_job_ends_aborted_and_the_cj_exits_zero_by_itself() {
    let label = "(c) abort during a task";
    if let Some(r) = run_scenario(label, &["--mode", "clear", "--scenario", "abort"]) {
        assert_eq!(r["status"], "FINISHED:ABORTED", "{label}");
        assert_clean_exits(label, &r);
    }
}

#[test]
fn job_completes_through_the_parent_on_the_default_mtls_kit() {
    let label = "(d) default kit, http + mTLS, CJ via its parent";
    if let Some(r) = run_scenario(label, &["--mode", "default", "--scenario", "complete"]) {
        assert_completed(label, &r);
    }
}

#[test]
fn job_completes_over_mtls_straight_to_the_server_on_a_tcp_kit() {
    let label = "(f) tcp + mTLS kit, CJ dials the server over TLS with the site's certificate";
    if let Some(r) = run_scenario(label, &["--mode", "mtls_tcp", "--scenario", "complete"]) {
        assert_completed(label, &r);
    }
}

#[test]
fn cross_site_validation_job_completes_with_fedrun_validating_and_submitting_its_model() {
    let label = "(e) clear tcp, cross-site validation";
    let Some(r) = run_scenario(label, &["--mode", "clear", "--scenario", "cross_val"]) else {
        return;
    };
    assert_completed(label, &r);
    // ValidationJsonGenerator's {data_client: {model_owner: metrics}}; every model is
    // [[3..11]] after two rounds, so NPValidator's score is 63/11 + random in [0, 1).
    let results = &r["cross_val"];
    let low = 63.0 / 11.0;
    for (validator, owner) in [
        ("site-1", "SRV_server"),
        ("site-1", "site-1"),
        ("site-1", "site-2"),
        ("site-2", "site-1"),
    ] {
        let accuracy = results[validator][owner]["accuracy"]
            .as_f64()
            .unwrap_or_else(|| {
                panic!("{label}: no accuracy by {validator} for {owner}'s model in {results}")
            });
        assert!(
            (low..low + 1.0).contains(&accuracy),
            "{label}: {validator} on {owner}'s model: accuracy {accuracy}"
        );
    }
}
