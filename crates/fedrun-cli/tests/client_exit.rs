//! A client process killed mid-round (`kill -9`), with real `fedrun server` and `fedrun client`
//! processes: the server counts it out once its connection has been gone for `--client-grace`
//! and fails the run then — not after its `--timeout` — and the surviving client, told that the
//! run failed, exits non-zero saying why; a client restarted within the grace is kept and the
//! run completes with every client exiting 0. Every wait has a deadline far below the
//! processes' `--timeout` of 600 s; child processes are killed if a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// Deadline of every wait: far below the `--timeout` the processes are given.
const DEADLINE: Duration = Duration::from_secs(90);
/// The `--timeout` of every process: a run that ends before [`DEADLINE`] did not wait for it.
const TIMEOUT: &str = "600";

/// `fedrun <args>` with `RUST_LOG=<log>`, output piped, killed if the test drops it.
fn fedrun(log: &str, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fedrun"))
        .args(args)
        .env("RUST_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the fedrun binary starts")
}

/// Waits for `child` to exit (its output collected), at most [`DEADLINE`].
async fn finish(child: Child, what: &str) -> Output {
    tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not exit within {DEADLINE:?}"))
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

struct Server {
    child: Child,
    url: String,
    job_id: String,
    workspace: PathBuf,
    /// The rest of its stdout (the first line was read).
    _stdout: BufReader<ChildStdout>,
}

/// `fedrun server` for site-1 and site-2 (both needed each round), `rounds` rounds.
async fn start_server(rounds: &str, client_grace: &str) -> Server {
    let workspace = std::env::temp_dir().join(format!("fedrun-cli-exit-{}", uuid::Uuid::new_v4()));
    let job_id = format!("exit-{}", uuid::Uuid::new_v4());
    let ws_arg = workspace.to_string_lossy().into_owned();
    let mut child = fedrun(
        "warn",
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--clients",
            "site-1,site-2",
            "--rounds",
            rounds,
            "--workspace",
            &ws_arg,
            "--job-id",
            &job_id,
            "--timeout",
            TIMEOUT,
            "--poll-interval-ms",
            "20",
            "--client-grace",
            client_grace,
        ],
    );
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    tokio::time::timeout(DEADLINE, stdout.read_line(&mut first))
        .await
        .expect("the server prints its address")
        .unwrap();
    let url = first
        .trim_end()
        .strip_prefix("listening ")
        .and_then(|rest| rest.strip_suffix(&format!(" job {job_id}")))
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    Server {
        child,
        url,
        job_id,
        workspace,
        _stdout: stdout,
    }
}

fn client(server: &Server, site: &str, log: &str) -> Child {
    fedrun(
        log,
        &[
            "client",
            "--server",
            &server.url,
            "--name",
            site,
            "--job-id",
            &server.job_id,
            "--timeout",
            TIMEOUT,
        ],
    )
}

/// Reads `child`'s stderr until a line contains `needle` (the rest of stderr is dropped).
async fn wait_for_stderr_line(child: &mut Child, needle: &str) {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(needle) {
                return;
            }
        }
        panic!("stderr closed before a line with {needle:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no stderr line with {needle:?} within {DEADLINE:?}"));
}

/// Kills `child` with SIGKILL and reaps it.
async fn kill_9(mut child: Child) {
    child.start_kill().unwrap();
    tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("a killed process exits")
        .unwrap();
}

#[actix::test]
async fn a_client_killed_mid_round_fails_the_run_after_the_grace_and_the_survivor_exits_non_zero() {
    let server = start_server("20", "1").await;
    let survivor = client(&server, "site-1", "warn");
    let mut victim = client(&server, "site-2", "info");
    wait_for_stderr_line(&mut victim, "executing task train").await;
    kill_9(victim).await;

    let Server {
        child,
        workspace,
        job_id,
        ..
    } = server;
    let (server_out, survivor_out) = tokio::join!(
        finish(child, "fedrun server"),
        finish(survivor, "fedrun client site-1")
    );
    let server_err = text(&server_out.stderr);
    assert!(!server_out.status.success(), "server: {server_err}");
    assert!(
        server_err.contains(&format!(
            "client job site-2.{job_id} did not come back within 1.0 s"
        )),
        "the server names the site and job it counted out: {server_err}"
    );
    assert!(
        !server_err.contains("did not end within"),
        "no --timeout: {server_err}"
    );

    let survivor_err = text(&survivor_out.stderr);
    assert!(!survivor_out.status.success(), "site-1: {survivor_err}");
    assert!(
        survivor_err.contains("the server ended the run as failed"),
        "site-1 says why: {survivor_err}"
    );
    let _ = std::fs::remove_dir_all(&workspace);
}

#[actix::test]
async fn a_client_restarted_within_the_grace_is_kept_and_the_run_completes_with_exit_0() {
    let server = start_server("3", "60").await;
    let site1 = client(&server, "site-1", "warn");
    let mut victim = client(&server, "site-2", "info");
    wait_for_stderr_line(&mut victim, "executing task train").await;
    kill_9(victim).await;
    let site2 = client(&server, "site-2", "warn");

    let Server {
        child, workspace, ..
    } = server;
    let (server_out, out1, out2) = tokio::join!(
        finish(child, "fedrun server"),
        finish(site1, "fedrun client site-1"),
        finish(site2, "fedrun client site-2 (restarted)")
    );
    for (what, out) in [
        ("server", &server_out),
        ("site-1", &out1),
        ("site-2", &out2),
    ] {
        assert!(
            out.status.success(),
            "{what}: {:?}\n{}",
            out.status,
            text(&out.stderr)
        );
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(workspace.join("metrics.json")).unwrap())
            .unwrap();
    assert_eq!(metrics["outcome"], serde_json::json!("completed"));
    let rounds = metrics["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    assert!(
        rounds.iter().all(|r| r["clients"] == serde_json::json!(2)),
        "{rounds:?}"
    );
    let _ = std::fs::remove_dir_all(&workspace);
}
