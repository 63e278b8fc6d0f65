//! Guarantees of the `RunInfo` actor: run info kept current, contexts with the right stickers,
//! a bounded error log, and aborts only for the own job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use actix::{Actor, Addr, Handler, Message};
use fedrun_core::{Map, Value};
use fedrun_engine::{
    AbortRun, GetAbortSignal, GetRunInfo, MarkRunStarted, NewContext, ReportError, ResetErrors,
    RunInfo, RunInfoConfig, SetCurrentTask, ShowErrors,
};

const DEADLINE: Duration = Duration::from_secs(5);

/// Sends `msg` and waits for the reply, with a deadline.
async fn ask<A, M>(addr: &Addr<A>, msg: M) -> M::Result
where
    A: Actor<Context = actix::Context<A>> + Handler<M>,
    M: Message + Send + 'static,
    M::Result: Send,
{
    tokio::time::timeout(DEADLINE, addr.send(msg))
        .await
        .expect("no reply before the deadline")
        .expect("actor mailbox closed")
}

/// A logger that keeps every line, so tests can check what was logged.
struct Capture(Mutex<Vec<(log::Level, String)>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .unwrap()
            .push((record.level(), record.args().to_string()));
    }
    fn flush(&self) {}
}

fn captured() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        if log::set_logger(capture).is_ok() {
            log::set_max_level(log::LevelFilter::Debug);
        }
        capture
    })
}

fn start(config: RunInfoConfig) -> Addr<RunInfo> {
    RunInfo::new(config).start()
}

#[actix::test]
async fn get_run_info_reports_job_and_current_task_and_start_time() {
    let run = start(RunInfoConfig::new("site-1", "job-1"));
    let info = ask(&run, GetRunInfo).await;
    assert_eq!(info.job_id, "job-1");
    assert_eq!(info.current_task_name, "");
    assert_eq!(info.start_time, None);

    let before = SystemTime::now();
    ask(&run, MarkRunStarted).await;
    let after = SystemTime::now();
    ask(
        &run,
        SetCurrentTask {
            name: Some("train".into()),
        },
    )
    .await;
    let info = ask(&run, GetRunInfo).await;
    assert_eq!(info.current_task_name, "train");
    let started = info.start_time.expect("start time set by MarkRunStarted");
    assert!(before <= started && started <= after);

    // A second start mark keeps the first time; clearing the task empties the name.
    ask(&run, MarkRunStarted).await;
    ask(&run, SetCurrentTask { name: None }).await;
    let info = ask(&run, GetRunInfo).await;
    assert_eq!(info.start_time, Some(started));
    assert_eq!(info.current_task_name, "");
}

#[actix::test]
async fn show_errors_is_none_until_an_error_is_reported() {
    let run = start(RunInfoConfig::new("site-1", "job-1"));
    assert_eq!(ask(&run, ShowErrors).await, None);

    ask(
        &run,
        ReportError {
            group: "aux".into(),
            key: "send".into(),
            message: "peer gone".into(),
        },
    )
    .await;
    let report = ask(&run, ShowErrors).await.expect("one error reported");
    assert_eq!(report.len(), 1);
    let records = report.records("aux", "send");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].message, "peer gone");

    let lines = report.lines();
    let line = &lines["aux"]["send"][0];
    // "<YYYY-mm-dd HH:MM:SS>: <msg>"
    assert_eq!(line.len(), "2024-01-01 00:00:00: peer gone".len(), "{line}");
    assert!(line.ends_with(": peer gone"), "{line}");
    let stamp = &line[..19];
    for (i, c) in stamp.chars().enumerate() {
        match i {
            4 | 7 => assert_eq!(c, '-', "{line}"),
            10 => assert_eq!(c, ' ', "{line}"),
            13 | 16 => assert_eq!(c, ':', "{line}"),
            _ => assert!(c.is_ascii_digit(), "{line}"),
        }
    }
}

#[actix::test]
async fn reset_errors_clears_the_log() {
    let run = start(RunInfoConfig::new("site-1", "job-1"));
    for key in ["a", "b"] {
        ask(
            &run,
            ReportError {
                group: "g".into(),
                key: key.into(),
                message: "m".into(),
            },
        )
        .await;
    }
    assert_eq!(ask(&run, ShowErrors).await.map(|r| r.len()), Some(2));
    ask(&run, ResetErrors).await;
    assert_eq!(ask(&run, ShowErrors).await, None);
}

#[actix::test]
async fn error_log_is_bounded_and_drops_oldest() {
    let run = start(RunInfoConfig::new("site-1", "job-1").with_max_error_records(3));
    for i in 0..5 {
        let group = if i % 2 == 0 { "even" } else { "odd" };
        ask(
            &run,
            ReportError {
                group: group.into(),
                key: "k".into(),
                message: format!("m{i}"),
            },
        )
        .await;
    }
    let report = ask(&run, ShowErrors).await.unwrap();
    assert_eq!(report.len(), 3);
    let even: Vec<&str> = report
        .records("even", "k")
        .iter()
        .map(|r| r.message.as_str())
        .collect();
    let odd: Vec<&str> = report
        .records("odd", "k")
        .iter()
        .map(|r| r.message.as_str())
        .collect();
    assert_eq!(even, ["m2", "m4"]);
    assert_eq!(odd, ["m3"]);
}

#[actix::test]
async fn new_context_carries_stickers() {
    let mut meta = Map::new();
    meta.insert("name", "my-job");
    let run = start(
        RunInfoConfig::new("site-1", "job-1")
            .with_job_meta(Value::Map(meta.clone()))
            .with_job_context_prop("__job_scope_name__", Value::from("")),
    );
    let ctx = ask(&run, NewContext).await;

    let public = ctx.public_props();
    assert_eq!(public.len(), 4, "{public:?}");
    assert_eq!(public.get("__run_num__"), Some(&Value::from("job-1")));
    assert_eq!(
        public.get("__identity_name__"),
        Some(&Value::from("site-1"))
    );
    assert_eq!(public.get("__fqsn__"), Some(&Value::from("site-1")));
    assert_eq!(public.get("__is_leaf__"), Some(&Value::from(true)));

    assert_eq!(ctx.get_prop("__process_type__"), Some(Value::from("CJ")));
    assert_eq!(
        ctx.get_prop("__client_config__"),
        Some(Value::Map(Map::new()))
    );
    assert_eq!(ctx.get_prop("__job_meta__"), Some(Value::Map(meta)));
    assert_eq!(ctx.get_prop("__job_scope_name__"), Some(Value::from("")));
    assert_eq!(ctx.job_id().as_deref(), Some("job-1"));
    assert_eq!(ctx.identity_name(), "site-1");

    // fqsn and is_leaf come from the client config when it has them.
    let mut client_args = Map::new();
    client_args.insert("fqsn", "org.site-1");
    client_args.insert("is_leaf", false);
    let run = start(RunInfoConfig::new("site-1", "job-1").with_client_config(client_args));
    let public = ask(&run, NewContext).await.public_props();
    assert_eq!(public.get("__fqsn__"), Some(&Value::from("org.site-1")));
    assert_eq!(public.get("__is_leaf__"), Some(&Value::from(false)));
}

#[actix::test]
async fn abort_run_for_own_job_triggers_signal() {
    let run = start(RunInfoConfig::new("site-1", "job-own"));
    let signal = ask(&run, GetAbortSignal).await;
    assert!(!signal.is_triggered());
    let aborted = ask(
        &run,
        AbortRun {
            job_id: "job-own".into(),
            reason: "Received command to abort job".into(),
        },
    )
    .await;
    assert!(aborted);
    tokio::time::timeout(DEADLINE, signal.triggered())
        .await
        .expect("the signal fetched before the abort fires");
    assert!(ask(&run, GetAbortSignal).await.is_triggered());
}

#[actix::test]
async fn abort_run_for_other_job_is_ignored_with_warning() {
    let capture = captured();
    let run = start(RunInfoConfig::new("site-1", "job-mine"));
    let signal = ask(&run, GetAbortSignal).await;
    let aborted = ask(
        &run,
        AbortRun {
            job_id: "job-theirs".into(),
            reason: "test".into(),
        },
    )
    .await;
    assert!(!aborted);
    assert!(!signal.is_triggered());
    let lines = capture.0.lock().unwrap();
    assert!(
        lines.iter().any(|(level, line)| *level == log::Level::Warn
            && line
                .contains("abort_app for job job-theirs ignored: this engine runs job job-mine")),
        "no warning logged: {lines:?}"
    );
}
