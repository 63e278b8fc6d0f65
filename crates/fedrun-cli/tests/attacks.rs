//! Issue #10's table of attacks on `fedrun server`, replayed against the real processes on
//! loopback by a peer without credentials: one test per row, named after the guarantee it
//! checks, sending exactly the input over a real socket. Each test then checks that the
//! server process stayed up, that a legitimate run (two real `fedrun client`s, the built-in
//! logistic-regression job, a few rounds) still completes with exit 0 everywhere, and that the
//! server's peak RSS and descriptor count stayed within the bounds stated below.
//!
//! Each test prints one line `ATTACK row=N peak_rss_kib=… rss_growth_kib=… peak_fds=…
//! outcome=…` on stderr (`cargo test -p fedrun-cli --test attacks -- --nocapture`): the figures
//! quoted in `docs/security-attacks.md`. The line is printed before the assertions, so a failing
//! test still reports what happened.
//!
//! Every wait has a deadline and waits on the event (a line of output, a process exit, a
//! closed connection). The only sleeps are the attacks' own pacing (row 2's bytes "slowly",
//! row 6's HELLO every 0.4 s), which the issue specifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::ExitStatus;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use common::attack::{Federation, Proc, ServerSpec, Usage};
use common::attacker::{
    fobs_request, forged_end_run, hello, hello_prefix_announcing, nil_array, Answer, Attacker,
};
use fedrun_cell::header;
use fedrun_core::constants::{channel, topic};
use fedrun_wire::FrameType;

/// Deadline of a whole legitimate run (server and clients exited). A run of a few rounds takes
/// about a second; the processes' own `--timeout` ([`PROCESS_TIMEOUT_SECS`]) is below this,
/// so a run that cannot complete ends by itself and the test reports why.
const RUN_DEADLINE: Duration = Duration::from_secs(60);
/// `--timeout` of the server and the clients (except row 7's, which tests the timeout itself).
const PROCESS_TIMEOUT_SECS: u64 = 45;
/// Deadline for the server to answer or refuse one hostile frame or connection.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline for a client to be given its first task.
const FIRST_TASK_DEADLINE: Duration = Duration::from_secs(30);
/// What a client logs (at info) when it runs a training task.
const TRAINING: &str = "executing task train";
const MIB: usize = 1024 * 1024;
const MIB_KIB: u64 = 1024;

/// Row 1: the 8 MiB frame is held once in the connection's read buffer and its decode may hold
/// a small multiple of the bytes present; before the fix, the decoder reserved ~48 bytes per
/// `nil` (+392 MiB for 8 Mi nils) and a declared count of 600 Mi made the server abort.
const ROW1_MAX_RSS_GROWTH_KIB: u64 = 64 * MIB_KIB;
/// Row 1: the `nil`s of the first variant (the count is declared exactly).
const ROW1_NILS: usize = 8 * MIB;
/// Row 1: the second variant declares 600 Mi elements (the 600 MiB payload) over 1 MiB.
const ROW1_DECLARED: u32 = 600 * MIB as u32;

/// Row 2: "RSS flat". The legitimate run itself moves the server's RSS by a few MiB and the
/// codec may reserve 1 MiB ahead of a frame; before the fix one such connection cost +1 GiB.
const ROW2_MAX_RSS_GROWTH_KIB: u64 = 24 * MIB_KIB;
/// Row 2: the length the HELLO's prefix announces.
const ROW2_ANNOUNCED: u32 = 1 << 30;
/// Row 2: the attacker sends at most this much of the announced body, 1 MiB at a time...
const ROW2_BODY_BYTES: usize = 192 * MIB;
/// ... one chunk per this period ("slowly": the attack's pacing, 50 MiB/s).
const ROW2_PACING: Duration = Duration::from_millis(20);
/// Row 2: what the server may take before its close reaches the attacker: the loopback socket
/// buffers of both ends (a few MiB) and the chunk in flight. A server that buffers the frame
/// takes all of [`ROW2_BODY_BYTES`].
const ROW2_MAX_BYTES_TAKEN: usize = 32 * MIB;

/// Row 3: rounds of the run the forged `__end_run__` tries to cut short (enough that the run
/// is still going when the forgery arrives after site-1's first task).
const ROW3_ROUNDS: u64 = 10;

/// Row 4: the server's descriptor limit, and the silent handshaken connections the attacker
/// opens (the figures: 118 under 128 fds locked the real clients out).
const ROW4_FD_LIMIT: u32 = 128;
const ROW4_SILENT: usize = 118;

/// Row 5: the endpoint name of the HELLO, and how many such HELLOs (before the fix each cost
/// +41 MiB and left a 10 MB log line).
const ROW5_NAME_LEN: usize = 10 * MIB;
const ROW5_CONNECTIONS: usize = 2;
/// Row 5: "RSS flat", as row 2.
const ROW5_MAX_RSS_GROWTH_KIB: u64 = 24 * MIB_KIB;
/// Row 5: the server's whole stderr (info level, a complete run) must stay below a tenth of the
/// name: a log that copied the name even once would exceed it.
const ROW5_MAX_SERVER_LOG_BYTES: u64 = MIB as u64;

/// Row 6: the pacing of the impostor's HELLOs.
const ROW6_PACING: Duration = Duration::from_millis(400);
/// Row 6: rounds and poll interval of the run: long enough (several seconds) for several
/// impostor HELLOs to land while site-1 is connected.
const ROW6_ROUNDS: u64 = 20;
const ROW6_POLL_MS: u64 = 150;
/// Row 6: fewer impostor attempts than this during the run means the attack did not overlap
/// the run, and the test proves nothing.
const ROW6_MIN_ATTEMPTS: usize = 3;

/// Row 7: the processes' `--timeout` (NVFlare-like default), the `--client-grace`, and the
/// deadline for the server to end after the kill: a tenth of the timeout, so a server that
/// waits for its timeout fails the test.
const ROW7_TIMEOUT_SECS: u64 = 600;
const ROW7_CLIENT_GRACE_SECS: u64 = 5;
const ROW7_DEADLINE: Duration = Duration::from_secs(60);
const ROW7_ROUNDS: u64 = 20;

/// Starts the server as `spec` says, with the suite's default timeout.
fn start(spec: ServerSpec) -> Federation {
    Federation::start(&ServerSpec {
        timeout_secs: PROCESS_TIMEOUT_SECS,
        ..spec
    })
}

/// The two legitimate clients.
fn clients(fed: &Federation) -> Vec<Proc> {
    ["site-1", "site-2"]
        .iter()
        .map(|site| fed.client(site, PROCESS_TIMEOUT_SECS))
        .collect()
}

/// How every process of a run ended.
struct RunEnd {
    server: Option<ExitStatus>,
    clients: Vec<Option<ExitStatus>>,
    usage: Usage,
}

impl RunEnd {
    fn summary(&self) -> String {
        let show = |s: &Option<ExitStatus>| match s {
            None => "running".to_owned(),
            Some(s) => s.code().map_or_else(|| format!("{s}"), |c| c.to_string()),
        };
        let clients: Vec<String> = self.clients.iter().map(show).collect();
        format!(
            "server exit {}, clients exit [{}]",
            show(&self.server),
            clients.join(",")
        )
    }
}

/// Waits (each at most `deadline` from now) for the server and the clients to exit, then
/// stops the sampler.
fn finish(fed: &mut Federation, clients: &mut [Proc], deadline: Duration) -> RunEnd {
    let end = Instant::now() + deadline;
    let left = || end.saturating_duration_since(Instant::now());
    let server = fed.server.wait_exit(left());
    let clients = clients.iter_mut().map(|c| c.wait_exit(left())).collect();
    RunEnd {
        server,
        clients,
        usage: fed.usage(),
    }
}

fn attack_line(row: u8, usage: &Usage, outcome: &str) {
    eprintln!(
        "ATTACK row={row} peak_rss_kib={} rss_growth_kib={} peak_fds={} outcome={outcome}",
        usage.peak_rss_kib,
        usage.rss_growth_kib(),
        usage.peak_fds
    );
}

/// The run completed: every process exited 0 and the server's metrics have `rounds` rounds,
/// each aggregated from both clients.
fn assert_completed(fed: &Federation, clients: &[Proc], end: &RunEnd, rounds: u64) {
    assert!(
        end.server.is_some_and(|s| s.success()),
        "{}",
        fed.server.describe()
    );
    for (client, status) in clients.iter().zip(&end.clients) {
        assert!(status.is_some_and(|s| s.success()), "{}", client.describe());
    }
    let metrics = fed.metrics().expect("the server wrote metrics.json");
    assert_eq!(metrics["outcome"], "completed", "{metrics}");
    let done = metrics["rounds"].as_array().expect("rounds");
    assert_eq!(done.len() as u64, rounds, "{metrics}");
    assert!(done.iter().all(|r| r["clients"] == 2), "{metrics}");
}

/// The server still runs after the attack.
fn assert_up(fed: &mut Federation, attack: &str) {
    assert!(
        fed.server.exited_yet().is_none(),
        "the server died of {attack}: {}",
        fed.server.describe()
    );
}

/// Waits until the server closes the connection or answers with a return code other than
/// `ok`; false if neither happens before the deadline.
fn refused(a: &mut Attacker) -> bool {
    let end = Instant::now() + REFUSAL_DEADLINE;
    loop {
        match a.next_frame(end.saturating_duration_since(Instant::now())) {
            Answer::Closed => return true,
            Answer::Silent => return false,
            Answer::Frame(f) => {
                let code = f
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(header::RETURN_CODE))
                    .and_then(|v| v.as_str().map(str::to_owned));
                if code.is_some_and(|c| c != "ok") {
                    return true;
                }
            }
        }
    }
}

/// Connects and says HELLO as `name`; true if READY came back.
fn handshake(fed: &Federation, name: &str) -> (Attacker, bool) {
    let mut a = Attacker::connect(fed.addr).expect("the server accepts a connection");
    a.send(&hello(name)).expect("HELLO sent");
    let ready = matches!(
        a.next_frame(REFUSAL_DEADLINE),
        Answer::Frame(f) if f.frame_type == FrameType::Ready
    );
    (a, ready)
}

#[test]
fn a_fobs_array_of_nils_after_hello_is_refused_without_memory_blowup_and_the_run_completes() {
    let mut fed = start(ServerSpec::default());
    let target = fed.job_cell("server");
    // each variant on its own connection, under its own name
    let variants = [
        (
            "8Mi-nils",
            "attacker-1a",
            nil_array(ROW1_NILS as u32, ROW1_NILS),
        ),
        (
            "600Mi-count-1MiB-body",
            "attacker-1b",
            nil_array(ROW1_DECLARED, MIB),
        ),
    ];
    let mut seen = Vec::new();
    for (label, name, payload) in variants {
        if fed.server.exited_yet().is_some() {
            break;
        }
        let (mut a, ready) = handshake(&fed, name);
        let request = fobs_request(
            name,
            &target,
            channel::SERVER_COMMAND,
            topic::GET_TASK,
            payload,
        );
        // a write that fails means the server closed the connection on the frame's bytes
        let written = a.send(&request).is_ok();
        let refused = !written || refused(&mut a);
        seen.push(format!("{label}:ready={ready},refused={refused}"));
    }
    let up = fed.server.exited_yet().is_none();
    let mut legit = if up { clients(&fed) } else { Vec::new() };
    let end = finish(&mut fed, &mut legit, RUN_DEADLINE);
    attack_line(
        1,
        &end.usage,
        &format!(
            "{}; up_after_attack={up}; {}",
            seen.join(" "),
            end.summary()
        ),
    );
    assert!(
        up,
        "the server died of the nil arrays: {}",
        fed.server.describe()
    );
    assert!(
        seen.iter().all(|s| s.ends_with("refused=true")),
        "every hostile payload is refused: {seen:?}"
    );
    assert_completed(&fed, &legit, &end, 2);
    assert!(
        end.usage.rss_growth_kib() < ROW1_MAX_RSS_GROWTH_KIB,
        "RSS grew by {} KiB (bound {ROW1_MAX_RSS_GROWTH_KIB} KiB)",
        end.usage.rss_growth_kib()
    );
}

#[test]
fn a_hello_announcing_1_gib_is_closed_at_its_prefix_and_rss_stays_flat() {
    let mut fed = start(ServerSpec::default());
    let mut a = Attacker::connect(fed.addr).expect("the server accepts a connection");
    a.set_write_timeout(REFUSAL_DEADLINE);
    let mut taken = 0;
    let mut closed = a
        .send_raw(&hello_prefix_announcing(ROW2_ANNOUNCED))
        .is_err();
    let chunk = vec![0u8; MIB];
    while !closed && taken < ROW2_BODY_BYTES {
        if a.send_raw(&chunk).is_err() {
            closed = true;
        } else {
            taken += chunk.len();
            // the attack's pacing ("then the bytes, slowly"), not a synchronisation
            thread::sleep(ROW2_PACING);
        }
    }
    let closed = closed || a.wait_closed(REFUSAL_DEADLINE);
    drop(a);
    assert_up(&mut fed, "a HELLO announcing 1 GiB");
    let mut legit = clients(&fed);
    let end = finish(&mut fed, &mut legit, RUN_DEADLINE);
    attack_line(
        2,
        &end.usage,
        &format!(
            "closed={closed} body_bytes_written_before_close={taken}; {}",
            end.summary()
        ),
    );
    assert!(closed, "the connection was closed");
    assert!(
        taken <= ROW2_MAX_BYTES_TAKEN,
        "the server kept reading the announced frame: {taken} bytes written before the close"
    );
    assert_completed(&fed, &legit, &end, 2);
    assert!(
        end.usage.rss_growth_kib() < ROW2_MAX_RSS_GROWTH_KIB,
        "RSS grew by {} KiB (bound {ROW2_MAX_RSS_GROWTH_KIB} KiB)",
        end.usage.rss_growth_kib()
    );
}

#[test]
fn a_forged_end_run_from_an_unauthenticated_peer_is_not_relayed_and_the_run_completes() {
    let mut fed = start(ServerSpec {
        rounds: ROW3_ROUNDS,
        poll_interval_ms: 100,
        ..ServerSpec::default()
    });
    let mut legit = clients(&fed);
    assert!(
        legit[0].stderr().wait_for(TRAINING, FIRST_TASK_DEADLINE),
        "site-1 got no task: {}",
        legit[0].describe()
    );
    let (mut a, ready) = handshake(&fed, "attacker-3");
    let forged = forged_end_run(
        &fed.job_cell("server"),
        &fed.job_cell("site-1"),
        &fed.job_id,
    );
    a.send(&forged).expect("the forged message is written");
    // the run was still going when the forgery went out
    let during_run = legit[0].exited_yet().is_none() && fed.server.exited_yet().is_none();
    let end = finish(&mut fed, &mut legit, RUN_DEADLINE);
    let site1 = legit[0].stdout().text();
    attack_line(
        3,
        &end.usage,
        &format!(
            "ready={ready} sent_during_run={during_run}; site-1: {:?}; {}",
            site1.trim_end(),
            end.summary()
        ),
    );
    drop(a);
    assert!(during_run, "the forgery went out after the run ended");
    assert!(
        site1.contains(&format!(
            "{ROW3_ROUNDS} task(s), {ROW3_ROUNDS} result(s) sent"
        )),
        "site-1 ran every round: {site1}"
    );
    assert_completed(&fed, &legit, &end, ROW3_ROUNDS);
}

#[test]
fn silent_handshaken_connections_under_a_128_fd_limit_do_not_lock_out_real_clients() {
    let mut fed = start(ServerSpec {
        fd_limit: Some(ROW4_FD_LIMIT),
        ..ServerSpec::default()
    });
    let mut silent = Vec::new();
    let mut refused_connects = 0;
    for i in 0..ROW4_SILENT {
        match Attacker::connect(fed.addr) {
            Ok(mut a) => {
                // the HELLO may meet a closed connection: the server recycles silent ones
                let _ = a.send(&hello(&format!("idle-{i}")));
                silent.push(a);
            }
            Err(_) => refused_connects += 1,
        }
    }
    assert_up(&mut fed, "118 silent connections");
    // the clients connect after the attack's connections (the listener's backlog is FIFO)
    let mut legit = clients(&fed);
    let end = finish(&mut fed, &mut legit, RUN_DEADLINE);
    let err = fed.server.stderr().text();
    let emfile_lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("Too many open files"))
        .collect();
    let emfile = !emfile_lines.is_empty();
    attack_line(
        4,
        &end.usage,
        &format!(
            "fd_limit={ROW4_FD_LIMIT} silent={} refused_connects={refused_connects} \
             emfile_logged={emfile}; {}",
            silent.len(),
            end.summary()
        ),
    );
    drop(silent);
    // Known gap (issue #10 stays open on it): a connection evicted "to make room" frees its slot
    // before its own task closes the socket, so under a tight fd limit the listener can still
    // hit EMFILE for a moment (logged, accept paused and retried). What this test guarantees
    // today is the row's harm: real clients get in and the run completes.
    if emfile {
        eprintln!(
            "KNOWN GAP row 4: the server ran out of descriptors {} time(s) during the attack",
            emfile_lines.len()
        );
    }
    assert_completed(&fed, &legit, &end, 2);
}

#[test]
fn a_hello_with_a_10_mib_endpoint_name_is_refused_with_flat_rss_and_a_short_log() {
    let mut fed = start(ServerSpec::default());
    let name = "x".repeat(ROW5_NAME_LEN);
    let mut seen = Vec::new();
    for _ in 0..ROW5_CONNECTIONS {
        let mut a = Attacker::connect(fed.addr).expect("the server accepts a connection");
        // a write that fails means the server closed the connection on the frame's bytes
        let written = a.send(&hello(&name)).is_ok();
        let (ready, closed) = if written {
            match a.next_frame(REFUSAL_DEADLINE) {
                Answer::Frame(f) => (
                    f.frame_type == FrameType::Ready,
                    a.wait_closed(REFUSAL_DEADLINE),
                ),
                Answer::Closed => (false, true),
                Answer::Silent => (false, false),
            }
        } else {
            (false, true)
        };
        seen.push((ready, closed));
    }
    assert_up(&mut fed, "a 10 MiB endpoint name");
    let mut legit = clients(&fed);
    let end = finish(&mut fed, &mut legit, RUN_DEADLINE);
    let log_bytes = fed.server.stderr().total_bytes();
    attack_line(
        5,
        &end.usage,
        &format!(
            "hellos(ready,closed)={seen:?} server_log_bytes={log_bytes}; {}",
            end.summary()
        ),
    );
    assert!(
        seen.iter().all(|&(ready, closed)| !ready && closed),
        "every 10 MiB HELLO is refused: {seen:?}"
    );
    assert_completed(&fed, &legit, &end, 2);
    assert!(
        end.usage.rss_growth_kib() < ROW5_MAX_RSS_GROWTH_KIB,
        "RSS grew by {} KiB (bound {ROW5_MAX_RSS_GROWTH_KIB} KiB)",
        end.usage.rss_growth_kib()
    );
    assert!(
        log_bytes < ROW5_MAX_SERVER_LOG_BYTES,
        "the server logged {log_bytes} bytes (bound {ROW5_MAX_SERVER_LOG_BYTES})"
    );
}

/// What the impostor of row 6 saw.
#[derive(Debug, Default)]
struct Impostor {
    attempts: usize,
    ready: usize,
    closed: usize,
    kept: usize,
}

#[test]
fn an_impostor_hello_every_0_4_s_does_not_evict_the_live_site_and_the_run_completes() {
    let mut fed = start(ServerSpec {
        rounds: ROW6_ROUNDS,
        poll_interval_ms: ROW6_POLL_MS,
        ..ServerSpec::default()
    });
    let mut legit = clients(&fed);
    assert!(
        legit[0].stderr().wait_for(TRAINING, FIRST_TASK_DEADLINE),
        "site-1 got no task: {}",
        legit[0].describe()
    );
    let (stop, stopped) = mpsc::channel::<()>();
    let (addr, claimed) = (fed.addr, fed.job_cell("site-1"));
    let impostor = thread::spawn(move || {
        let mut seen = Impostor::default();
        loop {
            seen.attempts += 1;
            if let Ok(mut a) = Attacker::connect(addr) {
                let _ = a.send(&hello(&claimed));
                let closed = match a.next_frame(REFUSAL_DEADLINE) {
                    Answer::Frame(f) => {
                        seen.ready += usize::from(f.frame_type == FrameType::Ready);
                        a.wait_closed(REFUSAL_DEADLINE)
                    }
                    Answer::Closed => true,
                    Answer::Silent => false,
                };
                if closed {
                    seen.closed += 1;
                } else {
                    seen.kept += 1;
                }
            }
            // the attack's pacing (a HELLO every 0.4 s), ended by the test
            match stopped.recv_timeout(ROW6_PACING) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return seen,
            }
        }
    });
    let end = finish(&mut fed, &mut legit, RUN_DEADLINE);
    let _ = stop.send(());
    let seen = impostor.join().expect("the impostor thread does not panic");
    attack_line(
        6,
        &end.usage,
        &format!("impostor={seen:?}; {}", end.summary()),
    );
    assert_eq!(seen.kept, 0, "an impostor connection was kept: {seen:?}");
    assert!(
        seen.attempts >= ROW6_MIN_ATTEMPTS,
        "the attack did not overlap the run: {seen:?}"
    );
    let site1 = legit[0].stdout().text();
    assert!(
        site1.contains(&format!(
            "{ROW6_ROUNDS} task(s), {ROW6_ROUNDS} result(s) sent"
        )),
        "site-1 ran every round: {site1}"
    );
    assert_completed(&fed, &legit, &end, ROW6_ROUNDS);
}

#[test]
fn a_client_killed_mid_round_ends_the_run_within_the_client_grace_and_the_survivor_reports_it() {
    // `--client-grace` is the fix's flag: a server without it fails to start, and this test
    // with it.
    let started = Federation::try_start(&ServerSpec {
        rounds: ROW7_ROUNDS,
        timeout_secs: ROW7_TIMEOUT_SECS,
        client_grace_secs: Some(ROW7_CLIENT_GRACE_SECS),
        ..ServerSpec::default()
    });
    let mut fed = started.unwrap_or_else(|why| {
        let first = why.lines().find(|l| l.starts_with("error")).unwrap_or("");
        attack_line(
            7,
            &Usage::default(),
            &format!("server did not start: {first}"),
        );
        panic!("{why}")
    });
    let mut survivor = fed.client("site-1", ROW7_TIMEOUT_SECS);
    let mut victim = fed.client("site-2", ROW7_TIMEOUT_SECS);
    assert!(
        victim.stderr().wait_for(TRAINING, FIRST_TASK_DEADLINE),
        "site-2 got no task: {}",
        victim.describe()
    );
    victim.kill_9();
    let killed = Instant::now();
    assert!(
        victim.wait_exit(REFUSAL_DEADLINE).is_some(),
        "site-2 survived kill -9"
    );
    let end = finish(&mut fed, std::slice::from_mut(&mut survivor), ROW7_DEADLINE);
    let after_kill = killed.elapsed().as_secs_f64();
    let outcome = fed
        .metrics()
        .and_then(|m| m["outcome"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "no metrics".to_owned());
    attack_line(
        7,
        &end.usage,
        &format!(
            "server_ended_{after_kill:.1}s_after_kill run_outcome={outcome:?}; {}",
            end.summary()
        ),
    );
    let server = end
        .server
        .unwrap_or_else(|| panic!("the server did not end within {ROW7_DEADLINE:?} of the kill"));
    let survived = end.clients[0]
        .unwrap_or_else(|| panic!("site-1 did not end within {ROW7_DEADLINE:?} of the kill"));
    assert_eq!(
        survived.success(),
        server.success(),
        "site-1 exits 0 exactly when the run completed (server: {server})\n{}",
        survivor.describe()
    );
}
