//! A reply that arrives after its request timed out is dropped with a warning, and the cell
//! keeps working. This test binary installs its own logger to observe that warning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fedrun_cell::{request_handler, Cell, CellMessage, Fqcn, Network, SendRequest};
use fedrun_core::CellReturnCode;
use tokio::sync::{oneshot, Notify};

const DEADLINE: Duration = Duration::from_secs(10);

/// Records every log line and wakes waiters on each new one.
struct Capture {
    lines: Mutex<Vec<(log::Level, String)>>,
    added: Notify,
}

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.lines
            .lock()
            .unwrap()
            .push((record.level(), record.args().to_string()));
        self.added.notify_waiters();
    }
    fn flush(&self) {}
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::new(Capture {
            lines: Mutex::new(Vec::new()),
            added: Notify::new(),
        }));
        log::set_logger(c).unwrap();
        log::set_max_level(log::LevelFilter::Debug);
        c
    })
}

/// Waits (with the deadline) for a warning containing all of `parts`.
async fn warning_containing(parts: &[&str]) -> String {
    let c = capture();
    tokio::time::timeout(DEADLINE, async {
        loop {
            let added = c.added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            if let Some((_, line)) = c.lines.lock().unwrap().iter().find(|(level, line)| {
                *level == log::Level::Warn && parts.iter().all(|p| line.contains(p))
            }) {
                return line.clone();
            }
            added.await;
        }
    })
    .await
    .expect("expected warning was not logged")
}

#[actix::test]
async fn late_reply_is_dropped_and_logged_without_crash() {
    capture();
    let net = Network::new();
    let server = Cell::start(Fqcn::SERVER, net.clone()).unwrap();
    let job = Cell::start(Fqcn::new("site-1.job1").unwrap(), net.clone()).unwrap();

    // The handler answers only when the test opens the gate, after the requester gave up.
    let (open_gate, gate) = oneshot::channel::<()>();
    let gate = Arc::new(Mutex::new(Some(gate)));
    server
        .register_request_handler(
            "late_channel",
            "late_topic",
            request_handler(move |req: CellMessage| {
                let gate = gate.lock().unwrap().take();
                async move {
                    match gate {
                        Some(gate) => {
                            let _ = gate.await;
                            Ok(Some(CellMessage::new(req.payload)))
                        }
                        None => Ok(Some(CellMessage::empty())),
                    }
                }
            }),
        )
        .await
        .unwrap();

    let reply = tokio::time::timeout(
        DEADLINE,
        job.send_request(SendRequest::new(
            "late_channel",
            "late_topic",
            Fqcn::SERVER,
            CellMessage::empty(),
            Duration::from_millis(100),
        )),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Timeout);
    let req_id = reply.headers.req_id().unwrap().to_owned();

    open_gate.send(()).unwrap();
    let line = warning_containing(&["site-1.job1", "late or unknown reply", &req_id]).await;
    assert!(
        line.contains("late_channel") && line.contains("late_topic") && line.contains("server")
    );

    // Both cells still serve.
    let reply = tokio::time::timeout(
        DEADLINE,
        job.send_request(SendRequest::new(
            "late_channel",
            "late_topic",
            Fqcn::SERVER,
            CellMessage::empty(),
            DEADLINE,
        )),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
}
