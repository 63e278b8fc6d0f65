//! The client job's side of its conversation with the client parent (CP).
//!
//! NVFlare's client parent launches the job process and then expects two things of it:
//!
//! - **status notifications**: `admin`/`train.notify_job_status` requests to the parent cell
//!   (`<site>`), whose payload is NVFlare's admin `Message` with headers `job_id` and
//!   `job_status` (2 = started, 3 = stopped). The parent uses them to classify the exit code
//!   and to decide how to abort (a started job is asked to abort and given a grace period; one
//!   that never said "started" is killed at once). [`notify_job_status`] sends one, retrying as
//!   NVFlare's job process does.
//! - **admin commands** on channel `client_command`, addressed to the job cell: `abort`,
//!   `abort_task`, `check_status`, `show_stats`, `show_errors`, `reset_errors`, `shutdown` and
//!   `configure_job_log`. [`register_command_handler`] answers them as NVFlare's command agent
//!   does: a reply with the command's result (and return code `ok`), an empty reply for commands
//!   that return nothing, `invalid_request` for an unknown command.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fedrun_cell::{
    request_handler, CellHandle, CellMessage, Fqcn, HandlerError, Payload, SendRequest,
};
use fedrun_core::{CellReturnCode, Map, Tagged, Value};
use fedrun_engine::{answer_info_command, EngineHandle, RunnerControl};

/// The channel of the parent's admin messages.
pub const ADMIN_CHANNEL: &str = "admin";
/// The topic of a job status notification.
pub const NOTIFY_JOB_STATUS_TOPIC: &str = "train.notify_job_status";
/// The channel of the parent's commands to the job.
pub const CLIENT_COMMAND_CHANNEL: &str = "client_command";
/// NVFlare's class of admin messages.
pub const ADMIN_MESSAGE_CLASS: &str = "nvflare.private.admin_defs.Message";
/// The decomposer of data classes.
const DATA_CLASS_DECOMPOSER: &str = "nvflare.fuel.utils.fobs.decomposer.DataClassDecomposer";

/// The job's status as the parent knows it (NVFlare's `ClientStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum JobStatus {
    /// Not started.
    NotStarted = 0,
    /// Starting: the engine is being set up.
    Starting = 1,
    /// Started: the task loop runs.
    Started = 2,
    /// Stopped: the run ended.
    Stopped = 3,
    /// The job failed.
    Exception = 4,
}

impl JobStatus {
    /// NVFlare's text for the status (the answer to `check_status`).
    pub fn message(self) -> &'static str {
        match self {
            JobStatus::NotStarted => "not started",
            JobStatus::Starting => "starting",
            JobStatus::Started => "started",
            JobStatus::Stopped => "stopped",
            JobStatus::Exception => "exception",
        }
    }

    fn from_u8(v: u8) -> JobStatus {
        match v {
            1 => JobStatus::Starting,
            2 => JobStatus::Started,
            3 => JobStatus::Stopped,
            4 => JobStatus::Exception,
            _ => JobStatus::NotStarted,
        }
    }
}

/// The job's current status, shared between the job and its command handler.
#[derive(Clone, Debug, Default)]
pub struct SharedStatus(Arc<AtomicU8>);

impl SharedStatus {
    /// Sets the status.
    pub fn set(&self, status: JobStatus) {
        self.0.store(status as u8, Ordering::SeqCst);
    }

    /// The status.
    pub fn get(&self) -> JobStatus {
        JobStatus::from_u8(self.0.load(Ordering::SeqCst))
    }
}

/// NVFlare's admin `Message` (a data class): `id`, `topic`, `body` and `headers`.
///
/// # Example
/// ```
/// use fedrun_cli::cj::parent::admin_message;
/// use fedrun_core::{Map, Value};
///
/// let headers: Map = [("job_status", Value::from(2))].into_iter().collect();
/// let msg = admin_message("train.notify_job_status", "", headers);
/// let t = msg.as_tagged().unwrap();
/// assert_eq!(t.type_name, "nvflare.private.admin_defs.Message");
/// ```
pub fn admin_message(topic: &str, body: &str, headers: Map) -> Value {
    let fields: Map = [
        ("id", Value::from(uuid::Uuid::new_v4().to_string())),
        ("topic", Value::from(topic)),
        ("body", Value::from(body)),
        ("headers", Value::Map(headers)),
    ]
    .into_iter()
    .collect();
    let data: Map = [("data", Value::Map(fields))].into_iter().collect();
    Value::Tagged(Box::new(Tagged {
        type_name: ADMIN_MESSAGE_CLASS.to_owned(),
        decomposer: DATA_CLASS_DECOMPOSER.to_owned(),
        data: Value::Map(data),
    }))
}

/// Tells the parent cell `parent` the job's status, retrying (each try waits `per_try` for
/// the answer) until the parent answers `ok` or `retry_for` has passed.
///
/// # Errors
///
/// The last failure, as text, when the parent never answered `ok`.
pub async fn notify_job_status(
    cell: &CellHandle,
    parent: &Fqcn,
    job_id: &str,
    status: JobStatus,
    retry_for: Duration,
    per_try: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + retry_for;
    loop {
        let headers: Map = [
            ("job_id", Value::from(job_id)),
            ("job_status", Value::from(status as u8 as i64)),
        ]
        .into_iter()
        .collect();
        let payload = admin_message(NOTIFY_JOB_STATUS_TOPIC, "", headers);
        let request = SendRequest::new(
            ADMIN_CHANNEL,
            NOTIFY_JOB_STATUS_TOPIC,
            parent.clone(),
            CellMessage::new(Payload::value(payload)),
            per_try,
        );
        let failure = match cell.send_request(request).await {
            Ok(reply) if reply.return_code() == CellReturnCode::Ok => return Ok(()),
            Ok(reply) => format!("the parent answered {}", reply.return_code()),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(failure);
        }
        log::debug!("notify_job_status {status:?} to {parent}: {failure}; retrying");
        tokio::time::sleep(Duration::from_millis(500).min(per_try)).await;
    }
}

/// What the command handler works on.
#[derive(Clone)]
pub struct CommandTarget {
    /// The job's engine.
    pub engine: EngineHandle,
    /// The job's task loop.
    pub runner: RunnerControl,
    /// The job's status.
    pub status: SharedStatus,
}

/// Registers the handler of the parent's commands (channel `client_command`, any topic) on the
/// job's cell.
///
/// # Errors
///
/// The cell's error when it does not take the registration.
pub async fn register_command_handler(target: CommandTarget) -> Result<(), fedrun_cell::CellError> {
    let cell = target.engine.cell().clone();
    let handler = request_handler(move |req: CellMessage| {
        let target = target.clone();
        async move { answer_command(&target, &req).await }
    });
    cell.register_request_handler(CLIENT_COMMAND_CHANNEL, "*", handler)
        .await
}

fn reply(value: impl Into<Value>) -> fedrun_cell::HandlerResult {
    Ok(Some(CellMessage::new(Payload::value(value.into()))))
}

fn empty_reply() -> fedrun_cell::HandlerResult {
    Ok(Some(CellMessage::new(Payload::None)))
}

async fn answer_command(target: &CommandTarget, req: &CellMessage) -> fedrun_cell::HandlerResult {
    let engine = &target.engine;
    let prefix = format!("[job={} site={}]", engine.job_id(), engine.site());
    let topic = req.headers.topic().unwrap_or("").to_owned();
    log::info!("{prefix} command from the parent: {topic}");
    let failed = |e: fedrun_engine::EngineError| HandlerError::Other(e.to_string());
    match topic.as_str() {
        "check_status" => reply(target.status.get().message()),
        "abort" => {
            log::warn!("{prefix} Received command to abort job");
            engine.abort_app(engine.job_id()).await.map_err(failed)?;
            empty_reply()
        }
        "abort_task" => {
            let n = target.runner.abort_current_tasks();
            log::info!("{prefix} abort_task: {n} running task(s) aborted");
            empty_reply()
        }
        "show_stats" | "show_errors" | "reset_errors" => {
            match answer_info_command(engine, &topic).await.map_err(failed)? {
                Some(value) => reply(value),
                None => empty_reply(),
            }
        }
        "shutdown" => empty_reply(),
        "configure_job_log" => {
            reply("configure_job_log is not supported by fedrun: its log is set with RUST_LOG")
        }
        other => {
            log::warn!("{prefix} unknown command {other:?} from the parent: invalid_request");
            Err(HandlerError::InvalidRequest)
        }
    }
}
