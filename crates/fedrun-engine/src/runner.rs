//! The client job's task loop (NVFlare's `ClientRunner`): fetch a task, run its executor, send
//! the result back, until the server ends the run or the job is aborted.
//!
//! [`ClientRunner`] drives one job on an [`EngineHandle`]; it owns no engine state, it only calls
//! the engine. One [`run`](ClientRunner::run):
//!
//! 1. registers the aux handlers `__end_run__` (end the run, reply `OK`) and `__do_task__` (run
//!    the task the request carries, headers `__task_name__`/`__task_id__`, and reply with its
//!    result);
//! 2. syncs with the server's runner: `__sync_runner__` until a reply says `OK` (the reply is
//!    looked at before the deadline), or [`EngineError::RunnerSyncFailed`] after
//!    `max_runner_sync_timeout`;
//! 3. fires `_about_to_start_run`, marks the run started, fires `_start_run`, and starts the job
//!    heartbeat (`__job_heartbeat__`, fire-and-forget, at once and then every
//!    `job_heartbeat_interval`);
//! 4. loops: get a task (none → wait `default_interval`; `__try_again__` → wait its
//!    `__wait_time__`; `__end_run__` → stop); a real task is checked (peer context present, same
//!    job), routed ([`TaskRouter`]), executed, and its result — with the task's cookie jar,
//!    `__task_name__` and `__task_id__` — is sent after a `__task_check__` (`OK` → send,
//!    `TASK_UNKNOWN` → drop, `COMMUNICATION_ERROR`/`SERVER_NOT_READY`/no reply → check again after
//!    `task_check_interval`, any other code → send, logged); a failed send is
//!    retried the same way; then wait the task's `__wait_time__`;
//! 5. always ends with the end-of-run events: `_abort_task` (when the run was aborted or a task
//!    was cut short), `_about_to_end_run`, `_end_run`.
//!
//! Every wait is a tokio timer raced against the runner's stop signal, which fires on the run's
//! abort ([`AbortApp`](crate::AbortApp)), on `__end_run__` (task or aux) and on
//! [`RunnerControl::end_run`]. A running executor gets a child of that signal: when it fires, the
//! executor is given [`RunnerConfig::task_abort_grace`] to return, and its result becomes
//! `TASK_ABORTED` whatever it returned. Results are not sent once the runner is stopping (as
//! NVFlare); a `__do_task__` result is the aux reply, so it is always returned.
//!
//! A normal end (`__end_run__`) stops the runner without triggering the run's abort signal, so
//! the engine (aux messages included) keeps working for the end-of-run event handlers; NVFlare
//! triggers the run's abort signal in both cases.
//!
//! The runner spawns its helpers (the heartbeat, the watch on the run's abort signal) with
//! `actix::spawn`: run it inside an actix `System`.
//!
//! Differences from NVFlare, on purpose: the first `__sync_runner__` is sent at once (then every
//! `default_interval`); the end-run readiness check (`_check_end_run_readiness`) is not done;
//! task data and result filters do not exist yet.
//!
//! Like NVFlare's runner, it sends its runner sync, job heartbeats and task checks to the task
//! server — the server, or the parent site of a hierarchical site
//! ([`EngineHandle::parent_target`]) — and keeps one context per task, from the pull
//! ([`TaskPull::ctx`], with the server's peer context and the session's `__ssid__`) to the result
//! push. It reports `ClientRunner: {job_id, current_tasks}` to `show_stats`.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fedrun_cell::AbortSignal;
use fedrun_core::constants::{
    config_var, event_type, fl_ctx_key, header_key, info_collector, reserved_topic,
};
use fedrun_core::{AppReturnCode, FlContext, Map, PeerContext, ReturnCode, Shareable, Value};
use futures::FutureExt;

use crate::aux::{aux_handler, AuxRequest, AuxTargets, SendAuxRequest};
use crate::component::{handler_fn, panic_text};
use crate::error::EngineError;
use crate::executor::TaskRouter;
use crate::handle::EngineHandle;
use crate::run_info::{MarkRunStarted, ReportError, SetCurrentTask};
use crate::stream::{
    ArraysProducer, ModelSlots, StreamObjects, MODEL_CHANNEL, MODEL_STREAM_HEADER, TOPIC_RESULT,
    TOPIC_WEIGHTS,
};
use crate::task_fetcher::TaskPull;
use crate::widgets::set_stats;

/// The error-log group under which the runner reports failed tasks; also its stats group.
pub const RUNNER_ERROR_GROUP: &str = "ClientRunner";

/// The Shareable entry holding a DXO.
const DXO_ENTRY: &str = "DXO";

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The runner's timing (NVFlare's client runner config variables).
///
/// # Example
/// ```
/// use std::time::Duration;
/// use fedrun_engine::RunnerConfig;
///
/// let config = RunnerConfig::default();
/// assert_eq!(config.default_interval, Duration::from_millis(500));
/// assert_eq!(config.job_heartbeat_interval, Duration::from_secs(10));
/// assert_eq!(config.get_task_timeout, None);
/// let fast = RunnerConfig { task_check_interval: Duration::from_millis(50), ..config };
/// assert_eq!(fast.task_check_timeout, Duration::from_secs(5));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RunnerConfig {
    /// The wait after a failed pull, and when the server gives no `__wait_time__` (0.5 s).
    pub default_interval: Duration,
    /// The wait between task checks, and before retrying a failed result send (5 s).
    pub task_check_interval: Duration,
    /// The timeout of one `__task_check__` request (5 s).
    pub task_check_timeout: Duration,
    /// The interval of the job heartbeat (10 s).
    pub job_heartbeat_interval: Duration,
    /// The timeout of one `__sync_runner__` request (2 s).
    pub runner_sync_timeout: Duration,
    /// How long to keep trying to sync with the server's runner (60 s).
    pub max_runner_sync_timeout: Duration,
    /// The timeout given to each task fetch (`None`: the engine's communication timeout).
    pub get_task_timeout: Option<Duration>,
    /// The timeout given to each result send (`None`: the engine's communication timeout).
    pub submit_task_result_timeout: Option<Duration>,
    /// How long an aborted executor may take to return before it is dropped (5 s; not an NVFlare
    /// setting: NVFlare waits for its thread indefinitely).
    pub task_abort_grace: Duration,
    /// How long a task whose model is streamed ([`MODEL_STREAM_HEADER`]) waits for the stream
    /// to complete (300 s).
    pub model_stream_timeout: Duration,
    /// Once a task has been done, how long task pulls may fail in a row before the runner
    /// concludes that the server job is gone and ends the run as if it had said `__end_run__`
    /// (`None`, the default: never; NVFlare's runner keeps pulling). A server job ends by
    /// telling its clients `__end_run__`, but a client that pulls between the server job's exit
    /// and that message only ever gets "cannot forward" back; without this it would hold the
    /// job open until the deployment's client-outcome timeout (15 minutes by default).
    pub end_run_after_failed_pulls: Option<Duration>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            default_interval: Duration::from_millis(500),
            task_check_interval: secs(config_var::TASK_CHECK_INTERVAL_DEFAULT),
            task_check_timeout: secs(config_var::TASK_CHECK_TIMEOUT_DEFAULT),
            job_heartbeat_interval: secs(config_var::JOB_HEARTBEAT_INTERVAL_DEFAULT),
            runner_sync_timeout: secs(config_var::RUNNER_SYNC_TIMEOUT_DEFAULT),
            max_runner_sync_timeout: secs(config_var::MAX_RUNNER_SYNC_TIMEOUT_DEFAULT),
            get_task_timeout: None,
            submit_task_result_timeout: None,
            task_abort_grace: Duration::from_secs(5),
            model_stream_timeout: Duration::from_secs(300),
            end_run_after_failed_pulls: None,
        }
    }
}

/// Why a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// The server ended it (`__end_run__` task or aux message), or [`RunnerControl::end_run`].
    EndRun,
    /// The run was aborted (its abort signal fired, e.g. through `AbortApp`).
    Aborted,
    /// The engine stopped answering while the loop ran (the text says what failed).
    Failed(String),
}

/// What a finished run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    /// Tasks processed (fetched or pushed with `__do_task__`), whatever their return code.
    pub tasks_done: usize,
    /// Results the server accepted (`submit_update` answered `ok`).
    pub results_sent: usize,
    /// Why the run ended.
    pub ended_by: RunEnd,
}

/// A task being executed, as [`RunnerControl::running_tasks`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningTask {
    /// The task's name.
    pub name: String,
    /// The task's id, when it has one.
    pub task_id: Option<String>,
}

struct Running {
    task: RunningTask,
    abort: AbortSignal,
}

/// What the loop, the aux handlers and the controls share.
struct Shared {
    engine: EngineHandle,
    router: TaskRouter,
    config: RunnerConfig,
    prefix: String,
    /// Fires when the runner must stop: run abort, end-run, end of `run()`.
    stop: AbortSignal,
    /// The first reason given for stopping.
    end_reason: Mutex<Option<RunEnd>>,
    running: Mutex<HashMap<u64, Running>>,
    next_key: AtomicU64,
    tasks_done: AtomicUsize,
    results_sent: AtomicUsize,
    /// A task was cut short by the stop signal or [`RunnerControl::abort_current_tasks`].
    task_aborted: AtomicBool,
    /// Models streamed by the server, per stream id.
    slots: ModelSlots,
}

/// How the checks before execution ended when they failed.
type PeerCheck = Result<PeerContext, AppReturnCode>;

/// The task check's verdict.
enum Check {
    Send,
    Gone,
    Retry,
}

impl Shared {
    /// Stops the runner, recording `reason` unless one was given before.
    fn request_stop(&self, reason: RunEnd) {
        if let Ok(mut r) = self.end_reason.lock() {
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.stop.trigger();
    }

    fn end_reason(&self) -> Option<RunEnd> {
        self.end_reason.lock().ok().and_then(|r| r.clone())
    }

    /// Waits `d`; false when the runner was stopped meanwhile.
    async fn wait(&self, d: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.stop.triggered() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    async fn new_context(&self) -> FlContext {
        match self.engine.new_context().await {
            Ok(ctx) => ctx,
            Err(e) => {
                log::warn!(
                    "{} no context from the engine ({e}); using a bare one",
                    self.prefix
                );
                let mut ctx = FlContext::new();
                ctx.put(fl_ctx_key::RUN_NUM, self.engine.job_id(), false, true);
                ctx.put(fl_ctx_key::IDENTITY_NAME, self.engine.site(), false, false);
                ctx
            }
        }
    }

    /// Fires an event; the context the handlers left (or `ctx` when firing failed).
    async fn fire(&self, event: &str, ctx: FlContext) -> FlContext {
        match self.engine.fire_event(event, ctx.clone()).await {
            Ok(ctx) => ctx,
            Err(e) => {
                log::error!("{} firing {event} failed: {e}", self.prefix);
                ctx
            }
        }
    }

    async fn report(&self, key: &str, message: String) {
        let report = ReportError {
            group: RUNNER_ERROR_GROUP.to_owned(),
            key: key.to_owned(),
            message,
        };
        if let Err(e) = self.engine.send(report).await {
            log::warn!("{} error not recorded: {e}", self.prefix);
        }
    }

    /// The peer check of a fetched task: its `__peer_ctx__` header must be a context of this job.
    fn peer_of_task(&self, data: &Shareable) -> PeerCheck {
        match data.header_or_none(header_key::PEER_CTX) {
            None | Some(Value::Nil) => Err(AppReturnCode::MissingPeerContext),
            Some(v) => v.as_context().cloned().ok_or(AppReturnCode::BadPeerContext),
        }
    }

    /// Runs one task and returns its result with the task's cookie jar, name and id, and the
    /// task's context as the handlers left it.
    async fn process_task(
        &self,
        name: &str,
        task_id: Option<&str>,
        data: Shareable,
        mut ctx: FlContext,
        peer: PeerCheck,
    ) -> (Shareable, FlContext) {
        self.tasks_done.fetch_add(1, Ordering::SeqCst);
        let jar = data.cookie_jar().filter(|j| !j.is_empty()).cloned();
        ctx.put(fl_ctx_key::TASK_NAME, name, true, false);
        if let Some(id) = task_id {
            ctx.put(fl_ctx_key::TASK_ID, id, true, false);
        }
        let checked = peer.and_then(|peer| {
            let peer_job = peer.get(fl_ctx_key::RUN_NUM).and_then(Value::as_str);
            if peer_job == Some(self.engine.job_id()) {
                Ok(peer)
            } else {
                log::error!(
                    "{} task {name} ({task_id:?}) comes from job {peer_job:?}, not this job \
                     (RUN_MISMATCH)",
                    self.prefix
                );
                Err(AppReturnCode::RunMismatch)
            }
        });
        let mut result = match checked {
            Err(rc) => {
                log::error!("{} task {name} ({task_id:?}) refused: {rc}", self.prefix);
                Shareable::make_reply(rc, None)
            }
            Ok(peer) => {
                ctx.set_peer_context(peer);
                match self.router.route(name) {
                    None => {
                        log::error!(
                            "{} no executor for task {name} ({task_id:?}) (TASK_UNKNOWN)",
                            self.prefix
                        );
                        Shareable::make_reply(AppReturnCode::TaskUnknown, None)
                    }
                    Some(executor) => {
                        let stream_id = data
                            .header_or_none(MODEL_STREAM_HEADER)
                            .and_then(Value::as_str)
                            .map(str::to_owned);
                        match self.fill_model(name, stream_id.as_deref(), data).await {
                            Err(refused) => refused,
                            Ok(data) => {
                                ctx = self.fire(event_type::BEFORE_TASK_EXECUTION, ctx).await;
                                let result =
                                    self.execute(&*executor, name, task_id, data, &ctx).await;
                                ctx = self.fire(event_type::AFTER_TASK_EXECUTION, ctx).await;
                                match stream_id {
                                    Some(id) => self.stream_result(name, &id, result).await,
                                    None => result,
                                }
                            }
                        }
                    }
                }
            }
        };
        if let Some(jar) = jar {
            result.set_cookie_jar(jar);
        }
        result.set_header(header_key::TASK_NAME, name);
        match task_id {
            Some(id) => result.set_header(header_key::TASK_ID, id),
            None => result.set_header(header_key::TASK_ID, Value::Nil),
        }
        if result.header_or_none(header_key::RC).is_none() {
            result.set_return_code(AppReturnCode::Ok);
        }
        (result, ctx)
    }

    /// For a task whose model is streamed (`stream_id`): waits for the stream's arrays (the
    /// runner's `model_stream_timeout`, or the stop) and puts them into the task's DXO. `Err`
    /// is the result to send instead (TASK_ABORTED on stop, EXECUTION_EXCEPTION otherwise).
    async fn fill_model(
        &self,
        name: &str,
        stream_id: Option<&str>,
        mut data: Shareable,
    ) -> Result<Shareable, Shareable> {
        let Some(id) = stream_id else {
            return Ok(data);
        };
        log::debug!("{} task {name}: waiting for model stream {id}", self.prefix);
        let arrays = match self
            .slots
            .take(id, self.config.model_stream_timeout, &self.stop)
            .await
        {
            Ok(arrays) => arrays,
            Err(why) if self.stop.is_triggered() => {
                self.task_aborted.store(true, Ordering::SeqCst);
                log::warn!("{} task {name}: {why} (TASK_ABORTED)", self.prefix);
                return Err(Shareable::make_reply(AppReturnCode::TaskAborted, None));
            }
            Err(why) => {
                let message = format!("task {name}: model stream {id} failed: {why}");
                log::error!("{} {message} (EXECUTION_EXCEPTION)", self.prefix);
                self.report("task", message).await;
                return Err(Shareable::make_reply(
                    AppReturnCode::ExecutionException,
                    None,
                ));
            }
        };
        match data.get_mut(DXO_ENTRY).and_then(Value::as_map_mut) {
            Some(dxo) => {
                let mut merged = dxo
                    .get("data")
                    .and_then(Value::as_map)
                    .cloned()
                    .unwrap_or_default();
                for (k, v) in arrays.iter() {
                    merged.insert(k.clone(), v.clone());
                }
                dxo.insert("data", merged);
                Ok(data)
            }
            None => {
                let message = format!("task {name}: streamed model but the task has no DXO");
                log::error!("{} {message} (EXECUTION_EXCEPTION)", self.prefix);
                self.report("task", message).await;
                Err(Shareable::make_reply(
                    AppReturnCode::ExecutionException,
                    None,
                ))
            }
        }
    }

    /// For a task whose model came streamed: streams the result's arrays to the server on
    /// (`fedrun.model`, `result`) — the DXO meta and kind go first, in the stream context — and
    /// returns the result without its arrays, naming the stream. A result that is not an `OK`
    /// DXO with arrays is returned as it is.
    async fn stream_result(&self, name: &str, id: &str, mut result: Shareable) -> Shareable {
        if !result.return_code().is_ok() {
            return result;
        }
        let Ok(dxo) = fedrun_core::Dxo::from_shareable(&result) else {
            return result;
        };
        let mut arrays = Vec::new();
        let mut rest = fedrun_core::Map::new();
        for (k, v) in dxo.data.iter() {
            match (k.as_str(), v.as_ndarray()) {
                (Some(key), Some(a)) => arrays.push((key.to_owned(), a.clone())),
                _ => {
                    rest.insert(k.clone(), v.clone());
                }
            }
        }
        if arrays.is_empty() {
            return result;
        }
        let failed = |why: String| async move {
            let message = format!("task {name}: result stream failed: {why}");
            log::error!("{} {message} (EXECUTION_EXCEPTION)", self.prefix);
            self.report("task", message).await;
            Shareable::make_reply(AppReturnCode::ExecutionException, None)
        };
        let producer = match ArraysProducer::new(arrays) {
            Ok(p) => p,
            Err(e) => return failed(e).await,
        };
        let mut stream_ctx = fedrun_core::StreamContext::new();
        stream_ctx.set(crate::stream::arrays::CTX_STREAM_ID, id);
        stream_ctx.set(crate::stream::arrays::CTX_SITE, self.engine.site());
        stream_ctx.set(crate::stream::arrays::CTX_META, dxo.meta.clone());
        stream_ctx.set(crate::stream::arrays::CTX_KIND, dxo.kind.to_value());
        let msg = StreamObjects::new(MODEL_CHANNEL, TOPIC_RESULT, AuxTargets::Server, producer)
            .with_stream_ctx(stream_ctx);
        let outcome = tokio::select! {
            biased;
            _ = self.stop.triggered() => None,
            o = self.engine.send(msg) => Some(o),
        };
        match outcome {
            None => {
                self.task_aborted.store(true, Ordering::SeqCst);
                log::warn!(
                    "{} task {name}: stopped while streaming the result",
                    self.prefix
                );
                Shareable::make_reply(AppReturnCode::TaskAborted, None)
            }
            Some(Ok(Ok(o))) if o.rc.is_ok() => {
                log::info!(
                    "{} task {name}: result streamed in {} piece(s) ({id})",
                    self.prefix,
                    o.pieces
                );
                if let Some(d) = result.get_mut(DXO_ENTRY).and_then(Value::as_map_mut) {
                    d.insert("data", rest);
                }
                result.set_header(MODEL_STREAM_HEADER, id);
                result
            }
            Some(Ok(Ok(o))) => failed(format!("{} ({:?})", o.rc, o.result)).await,
            Some(Ok(Err(e)) | Err(e)) => failed(e.to_string()).await,
        }
    }

    /// Runs the executor with a child of the stop signal; see the module doc for aborts.
    async fn execute(
        &self,
        executor: &dyn crate::executor::Executor,
        name: &str,
        task_id: Option<&str>,
        data: Shareable,
        ctx: &FlContext,
    ) -> Shareable {
        let abort = self.stop.child();
        let key = self.next_key.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut running) = self.running.lock() {
            running.insert(
                key,
                Running {
                    task: RunningTask {
                        name: name.to_owned(),
                        task_id: task_id.map(str::to_owned),
                    },
                    abort: abort.clone(),
                },
            );
        }
        log::info!("{} executing task {name} ({task_id:?})", self.prefix);
        let started = Instant::now();
        let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| {
            executor.execute(name, data, ctx, abort.clone())
        })) {
            Err(panic) => Err(format!("executor {}", panic_text(panic.as_ref()))),
            Ok(fut) => {
                let mut guarded = AssertUnwindSafe(fut).catch_unwind();
                let flatten =
                    |r: Result<Result<Shareable, String>, Box<dyn std::any::Any + Send>>| {
                        r.unwrap_or_else(|panic| {
                            Err(format!("executor {}", panic_text(panic.as_ref())))
                        })
                    };
                tokio::select! {
                    biased;
                    r = &mut guarded => flatten(r),
                    _ = abort.triggered() => {
                        match tokio::time::timeout(self.config.task_abort_grace, &mut guarded).await {
                            Ok(r) => flatten(r),
                            Err(_) => Err(format!(
                                "executor did not return within {:?} of the abort; dropped",
                                self.config.task_abort_grace
                            )),
                        }
                    }
                }
            }
        };
        if let Ok(mut running) = self.running.lock() {
            running.remove(&key);
        }
        if abort.is_triggered() {
            self.task_aborted.store(true, Ordering::SeqCst);
            log::warn!(
                "{} task {name} ({task_id:?}) aborted after {:?} (TASK_ABORTED)",
                self.prefix,
                started.elapsed()
            );
            return Shareable::make_reply(AppReturnCode::TaskAborted, None);
        }
        match outcome {
            Ok(result) => {
                log::info!(
                    "{} task {name} ({task_id:?}) done in {:?}: {}",
                    self.prefix,
                    started.elapsed(),
                    result.return_code()
                );
                result
            }
            Err(e) => {
                let message = format!("task {name} ({task_id:?}) failed: {e}");
                log::error!("{} {message} (EXECUTION_EXCEPTION)", self.prefix);
                self.report("task", message).await;
                Shareable::make_reply(AppReturnCode::ExecutionException, None)
            }
        }
    }

    /// Asks the server whether it still wants the result of `task_id`.
    async fn task_check(&self, task_id: &str) -> Check {
        let mut request = Shareable::new();
        request.set_header(header_key::TASK_ID, task_id);
        let msg = SendAuxRequest::new(
            self.engine.parent_target(),
            reserved_topic::TASK_CHECK,
            request,
            self.config.task_check_timeout,
        )
        .with_optional(true);
        let replies = match self.engine.send(msg).await {
            Ok(Ok(replies)) => replies,
            Ok(Err(e)) | Err(e) => {
                log::warn!("{} task check of {task_id} failed: {e}", self.prefix);
                return Check::Retry;
            }
        };
        let Some(reply) = replies.get(self.engine.parent_reply_key()) else {
            log::warn!("{} task check of {task_id}: no reply", self.prefix);
            return Check::Retry;
        };
        match reply.return_code() {
            ReturnCode::App(AppReturnCode::Ok) => Check::Send,
            ReturnCode::App(AppReturnCode::TaskUnknown) => Check::Gone,
            ReturnCode::App(AppReturnCode::CommunicationError)
            | ReturnCode::App(AppReturnCode::ServerNotReady) => {
                log::info!(
                    "{} task check of {task_id}: {}; checking again",
                    self.prefix,
                    reply.return_code()
                );
                Check::Retry
            }
            other => {
                log::warn!(
                    "{} task check of {task_id} answered {other}; sending the result anyway",
                    self.prefix
                );
                Check::Send
            }
        }
    }

    /// Sends a task's result: task check, then `submit_update`, retried until accepted, dropped or
    /// the runner stops. True when the server accepted it.
    async fn send_result(
        &self,
        result: Shareable,
        ctx: &FlContext,
        name: &str,
        task_id: Option<&str>,
    ) -> bool {
        // Arrays sent as download references are offered once: the retries below then keep
        // (and clone) only the references, never a second handle on a big array.
        let mut result = match self.engine.offer_task_result(result).await {
            Ok(offered) => offered,
            Err(e) => {
                log::error!(
                    "{} result of task {name} ({task_id:?}) lost: {e}",
                    self.prefix
                );
                return false;
            }
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if self.stop.is_triggered() {
                log::info!(
                    "{} run stopping: result of task {name} ({task_id:?}) not sent",
                    self.prefix
                );
                return false;
            }
            result.set_header(header_key::MSG_ROOT_ID, uuid::Uuid::new_v4().to_string());
            if let Some(id) = task_id {
                loop {
                    let check = tokio::select! {
                        biased;
                        _ = self.stop.triggered() => return false,
                        c = self.task_check(id) => c,
                    };
                    match check {
                        Check::Send => break,
                        Check::Gone => {
                            log::warn!(
                                "{} task {name} ({id}) is no longer wanted by the server \
                                 (TASK_UNKNOWN): result dropped",
                                self.prefix
                            );
                            return false;
                        }
                        Check::Retry => {
                            if !self.wait(self.config.task_check_interval).await {
                                return false;
                            }
                        }
                    }
                }
            }
            log::info!(
                "{} try #{attempt}: sending the result of task {name} ({task_id:?})",
                self.prefix
            );
            let sent = tokio::select! {
                biased;
                _ = self.stop.triggered() => return false,
                s = self.engine.send_task_result_in(
                    ctx.clone(),
                    result.clone(),
                    self.config.submit_task_result_timeout,
                ) => s,
            };
            match sent {
                Ok(true) => {
                    self.results_sent.fetch_add(1, Ordering::SeqCst);
                    return true;
                }
                Ok(false) => log::warn!(
                    "{} the server did not take the result of task {name} ({task_id:?}); \
                     trying again",
                    self.prefix
                ),
                Err(e @ EngineError::ActorGone { .. }) => {
                    log::error!("{} result of task {name} not sent: {e}", self.prefix);
                    return false;
                }
                Err(e) => log::warn!(
                    "{} sending the result of task {name} failed: {e}; trying again",
                    self.prefix
                ),
            }
            if !self.wait(self.config.task_check_interval).await {
                return false;
            }
        }
    }

    /// Syncs with the server's runner: true when synced, false when stopped first.
    async fn sync(&self) -> Result<bool, EngineError> {
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let msg = SendAuxRequest::new(
                self.engine.parent_target(),
                reserved_topic::SYNC_RUNNER,
                Shareable::new(),
                self.config.runner_sync_timeout,
            )
            .with_optional(true);
            let reply = tokio::select! {
                biased;
                _ = self.stop.triggered() => return Ok(false),
                r = self.engine.send(msg) => r,
            };
            // The reply is looked at before the deadline.
            match reply {
                Err(e) => return Err(e),
                Ok(Ok(replies)) => match replies
                    .get(self.engine.parent_reply_key())
                    .map(Shareable::return_code)
                {
                    Some(rc) if rc.is_ok() => {
                        log::info!(
                            "{} synced with the server runner (attempt {attempt}, {:?})",
                            self.prefix,
                            started.elapsed()
                        );
                        return Ok(true);
                    }
                    rc => log::debug!(
                        "{} sync attempt {attempt}: server answered {rc:?}",
                        self.prefix
                    ),
                },
                Ok(Err(e)) => log::debug!("{} sync attempt {attempt} failed: {e}", self.prefix),
            }
            let waited = started.elapsed();
            if waited >= self.config.max_runner_sync_timeout {
                return Err(EngineError::RunnerSyncFailed {
                    target: self.engine.parent_reply_key().to_owned(),
                    waited,
                });
            }
            if !self.wait(self.config.default_interval).await {
                return Ok(false);
            }
        }
    }

    /// The wait a task (or a `__try_again__`) asks for, else the default interval.
    fn wait_time(&self, data: &Shareable) -> Duration {
        data.header_or_none(header_key::WAIT_TIME)
            .and_then(Value::as_f64)
            .filter(|s| s.is_finite() && *s >= 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .unwrap_or(self.config.default_interval)
    }

    /// The task loop; returns only when the runner stops or the engine is gone.
    async fn task_loop(&self) -> Option<RunEnd> {
        // When pulls started failing in a row (after a task was done): the server-gone check.
        let mut failing_since: Option<Instant> = None;
        while !self.stop.is_triggered() {
            let fetched = tokio::select! {
                biased;
                _ = self.stop.triggered() => break,
                t = self.engine.pull_task(None, self.config.get_task_timeout) => t,
            };
            let failed = matches!(fetched, Err(_) | Ok(TaskPull { task: None, .. }));
            if !failed {
                failing_since = None;
            } else if let (Some(limit), true) = (
                self.config.end_run_after_failed_pulls,
                self.tasks_done.load(Ordering::SeqCst) > 0,
            ) {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= limit {
                    log::warn!(
                        "{} the server job has not answered a task pull for {:.1} s after the \
                         last task: it is gone, ending the run",
                        self.prefix,
                        since.elapsed().as_secs_f64()
                    );
                    self.request_stop(RunEnd::EndRun);
                    break;
                }
            }
            let interval = match fetched {
                Err(e @ EngineError::ActorGone { .. }) => {
                    log::error!("{} cannot fetch tasks: {e}", self.prefix);
                    return Some(RunEnd::Failed(e.to_string()));
                }
                Err(e) => {
                    log::warn!("{} task fetch failed: {e}", self.prefix);
                    self.config.default_interval
                }
                Ok(TaskPull { task: None, .. }) => {
                    log::debug!("{} no task (failed pull)", self.prefix);
                    self.config.default_interval
                }
                Ok(TaskPull {
                    task: Some(task), ..
                }) if task.is_end_run() => {
                    log::info!("{} the server ended the run", self.prefix);
                    self.request_stop(RunEnd::EndRun);
                    break;
                }
                Ok(TaskPull {
                    task: Some(task), ..
                }) if task.is_try_again() => self.wait_time(&task.data),
                Ok(TaskPull {
                    task: Some(task),
                    ctx,
                }) => {
                    let interval = self.wait_time(&task.data);
                    let peer = self.peer_of_task(&task.data);
                    // The pull's context (peer context, session) is the task's, as NVFlare's
                    // runner keeps one context from fetch to send.
                    let task_id = task.task_id.as_deref();
                    let (result, ctx) = self
                        .process_task(&task.name, task_id, task.data, ctx, peer)
                        .await;
                    let ctx = self.fire(event_type::BEFORE_SEND_TASK_RESULT, ctx).await;
                    if !self.send_result(result, &ctx, &task.name, task_id).await {
                        if let Err(e) = self.engine.send(SetCurrentTask { name: None }).await {
                            log::debug!("{} current task not cleared: {e}", self.prefix);
                        }
                    }
                    self.fire(event_type::AFTER_SEND_TASK_RESULT, ctx).await;
                    interval
                }
            };
            if !self.wait(interval).await {
                break;
            }
        }
        None
    }

    /// The end-of-run events (always fired).
    async fn end_sequence(&self, aborted: bool) {
        let mut ctx = self.new_context().await;
        if aborted || self.task_aborted.load(Ordering::SeqCst) {
            ctx.put(fl_ctx_key::RUN_ABORT_REQUESTED, aborted, true, false);
            ctx = self.fire(event_type::ABORT_TASK, ctx).await;
        }
        ctx = self.fire(event_type::ABOUT_TO_END_RUN, ctx).await;
        self.fire(event_type::END_RUN, ctx).await;
    }

    fn outcome(&self, ended_by: RunEnd) -> RunOutcome {
        RunOutcome {
            tasks_done: self.tasks_done.load(Ordering::SeqCst),
            results_sent: self.results_sent.load(Ordering::SeqCst),
            ended_by,
        }
    }
}

/// Runs the task loop of one client job (see the module doc).
///
/// # Example
/// ```
/// use std::time::Duration;
/// use fedrun_cell::Network;
/// use fedrun_engine::{ClientEngine, ClientRunner, EngineError, RunEnd, RunnerConfig, TaskRouter};
///
/// actix::System::new().block_on(async {
///     // No server job on this network: the runner cannot sync and says so.
///     let engine = ClientEngine::builder("site-1", "job-1").start(&Network::new()).await.unwrap();
///     let config = RunnerConfig {
///         default_interval: Duration::from_millis(10),
///         runner_sync_timeout: Duration::from_millis(50),
///         max_runner_sync_timeout: Duration::from_millis(100),
///         ..RunnerConfig::default()
///     };
///     let runner = ClientRunner::new(engine, TaskRouter::new(), config);
///     let control = runner.control();
///     let err = runner.run().await.unwrap_err();
///     assert!(matches!(err, EngineError::RunnerSyncFailed { .. }));
///     assert!(control.is_stopped());
/// });
/// ```
pub struct ClientRunner {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ClientRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRunner")
            .field("engine", &self.shared.engine)
            .field("router", &self.shared.router)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl ClientRunner {
    /// A runner of `engine`'s job with `router`'s executors (nothing happens before
    /// [`run`](ClientRunner::run)).
    pub fn new(engine: EngineHandle, router: TaskRouter, config: RunnerConfig) -> Self {
        let prefix = format!(
            "[job={} site={}] ClientRunner:",
            engine.job_id(),
            engine.site()
        );
        ClientRunner {
            shared: Arc::new(Shared {
                engine,
                router,
                config,
                prefix,
                stop: AbortSignal::new(),
                end_reason: Mutex::new(None),
                running: Mutex::new(HashMap::new()),
                next_key: AtomicU64::new(0),
                tasks_done: AtomicUsize::new(0),
                results_sent: AtomicUsize::new(0),
                task_aborted: AtomicBool::new(false),
                slots: ModelSlots::new(),
            }),
        }
    }

    /// A control of this runner, usable while it runs.
    pub fn control(&self) -> RunnerControl {
        RunnerControl {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Runs the job until the server ends it, it is aborted, or the engine stops answering.
    ///
    /// `Ok` once the loop ran, with why it ended; `Err` when the run could not start: the
    /// engine is gone, an aux handler of the runner cannot be registered (one runner per engine:
    /// [`EngineError::DuplicateAuxHandler`]), or the server's runner did not answer the sync in
    /// time ([`EngineError::RunnerSyncFailed`]). The end-of-run events are fired in every case
    /// where the engine still answers.
    pub async fn run(self) -> Result<RunOutcome, EngineError> {
        let shared = self.shared;
        let result = Self::run_inner(&shared).await;
        shared.stop.trigger();
        match &result {
            Ok(outcome) => log::info!(
                "{} run ended ({:?}): {} task(s) done, {} result(s) sent",
                shared.prefix,
                outcome.ended_by,
                outcome.tasks_done,
                outcome.results_sent
            ),
            Err(e) => log::error!("{} run could not start: {e}", shared.prefix),
        }
        result
    }

    /// Runs the job on the current actix arbiter; see [`run`](ClientRunner::run).
    pub fn spawn(self) -> tokio::task::JoinHandle<Result<RunOutcome, EngineError>> {
        actix::spawn(self.run())
    }

    async fn run_inner(shared: &Arc<Shared>) -> Result<RunOutcome, EngineError> {
        let run_abort = shared.engine.abort_signal().await?;
        // The run's abort stops the runner; the link ends with the runner.
        {
            let weak = Arc::downgrade(shared);
            let stop = shared.stop.clone();
            actix::spawn(async move {
                tokio::select! {
                    _ = run_abort.triggered() => {
                        if let Some(shared) = weak.upgrade() {
                            shared.request_stop(RunEnd::Aborted);
                        } else {
                            stop.trigger();
                        }
                    }
                    _ = stop.triggered() => {}
                }
            });
        }
        Self::register_handlers(shared).await?;

        let synced = shared.sync().await;
        let synced = match synced {
            Ok(synced) => synced,
            Err(e) => {
                let aborted = shared.end_reason() == Some(RunEnd::Aborted);
                shared.stop.trigger();
                shared.end_sequence(aborted).await;
                return Err(e);
            }
        };
        let mut ended_by = None;
        if synced {
            let ctx = shared.new_context().await;
            let ctx = shared.fire(event_type::ABOUT_TO_START_RUN, ctx).await;
            shared.engine.send(MarkRunStarted).await?;
            shared.fire(event_type::START_RUN, ctx).await;
            let heartbeat = actix::spawn(Self::heartbeat(Arc::clone(shared)));
            ended_by = shared.task_loop().await;
            shared.stop.trigger();
            if let Err(e) = heartbeat.await {
                log::warn!("{} heartbeat task failed: {e}", shared.prefix);
            }
        }
        let ended_by = ended_by
            .or_else(|| shared.end_reason())
            .unwrap_or(RunEnd::EndRun);
        shared.stop.trigger();
        shared.end_sequence(ended_by == RunEnd::Aborted).await;
        Ok(shared.outcome(ended_by))
    }

    async fn heartbeat(shared: Arc<Shared>) {
        loop {
            // Fire-and-forget (zero timeout) to the task server: the server or the parent site.
            let msg = SendAuxRequest::new(
                shared.engine.parent_target(),
                reserved_topic::JOB_HEARTBEAT,
                Shareable::new(),
                Duration::ZERO,
            )
            .with_optional(true);
            match shared.engine.send(msg).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => log::debug!("{} job heartbeat not sent: {e}", shared.prefix),
                Err(e) => {
                    log::warn!("{} job heartbeat stops: {e}", shared.prefix);
                    return;
                }
            }
            if !shared.wait(shared.config.job_heartbeat_interval).await {
                return;
            }
        }
    }

    async fn register_handlers(shared: &Arc<Shared>) -> Result<(), EngineError> {
        let weak = Arc::downgrade(shared);
        let end_run = aux_handler(move |_req: AuxRequest| {
            if let Some(shared) = weak.upgrade() {
                log::info!("{} __end_run__ received: ending the run", shared.prefix);
                shared.request_stop(RunEnd::EndRun);
            }
            async { Ok(Shareable::make_reply(AppReturnCode::Ok, None)) }
        });
        shared
            .engine
            .register_aux_message_handler(reserved_topic::END_RUN, end_run)
            .await?;

        let weak: Weak<Shared> = Arc::downgrade(shared);
        let do_task = aux_handler(move |req: AuxRequest| {
            let shared = weak.upgrade();
            async move { Ok(Self::do_task(shared, req).await) }
        });
        shared
            .engine
            .register_aux_message_handler(reserved_topic::DO_TASK, do_task)
            .await?;
        // NVFlare's runner reports its job id and current tasks to `show_stats`.
        let weak: Weak<Shared> = Arc::downgrade(shared);
        let stats = handler_fn(
            RUNNER_ERROR_GROUP,
            move |event: &str, ctx: &mut FlContext| {
                if event != info_collector::EVENT_TYPE_GET_STATS {
                    return Ok(());
                }
                let Some(shared) = weak.upgrade() else {
                    return Ok(());
                };
                let tasks: Vec<Value> = match shared.running.lock() {
                    Ok(running) => running
                        .values()
                        .map(|r| Value::from(r.task.name.as_str()))
                        .collect(),
                    Err(_) => Vec::new(),
                };
                let mut info = Map::new();
                info.insert("job_id", shared.engine.job_id());
                info.insert("current_tasks", tasks);
                set_stats(ctx, RUNNER_ERROR_GROUP, info);
                Ok(())
            },
        );
        shared.engine.add_handler(stats).await?;
        // the ready-made consumer of models the server streams (large-model ScatterAndGather)
        shared
            .engine
            .register_stream_processing(MODEL_CHANNEL, TOPIC_WEIGHTS, shared.slots.clone())
            .await
    }

    /// `__do_task__`: the request is the task; its result is the reply.
    async fn do_task(shared: Option<Arc<Shared>>, req: AuxRequest) -> Shareable {
        let name = req
            .request
            .header_or_none(header_key::TASK_NAME)
            .and_then(Value::as_str)
            .map(str::to_owned);
        let task_id = req
            .request
            .header_or_none(header_key::TASK_ID)
            .and_then(Value::as_str)
            .map(str::to_owned);
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            log::error!("__do_task__ request without a task name (BAD_TASK_DATA)");
            return Shareable::make_reply(AppReturnCode::BadTaskData, None);
        };
        let shared = match shared {
            Some(shared) if !shared.stop.is_triggered() => shared,
            _ => {
                log::warn!("__do_task__ {name} ({task_id:?}) after the run ended (TASK_ABORTED)");
                let mut reply = Shareable::make_reply(AppReturnCode::TaskAborted, None);
                reply.set_header(header_key::TASK_NAME, name.as_str());
                if let Some(id) = &task_id {
                    reply.set_header(header_key::TASK_ID, id.as_str());
                }
                return reply;
            }
        };
        log::info!("{} __do_task__ {name} ({task_id:?})", shared.prefix);
        let peer = req
            .ctx
            .peer_context()
            .cloned()
            .ok_or(AppReturnCode::MissingPeerContext);
        let (result, _ctx) = shared
            .process_task(&name, task_id.as_deref(), req.request, req.ctx, peer)
            .await;
        result
    }
}

/// Controls a [`ClientRunner`] while it runs (cloneable; get one with
/// [`ClientRunner::control`]).
///
/// # Example
/// ```
/// use fedrun_cell::Network;
/// use fedrun_engine::{ClientEngine, ClientRunner, RunnerConfig, TaskRouter};
///
/// actix::System::new().block_on(async {
///     let engine = ClientEngine::builder("site-1", "job-1").start(&Network::new()).await.unwrap();
///     let runner = ClientRunner::new(engine, TaskRouter::new(), RunnerConfig::default());
///     let control = runner.control();
///     assert!(control.running_tasks().is_empty());
///     control.end_run(); // before it even synced: run() ends at once
///     let outcome = runner.run().await.unwrap();
///     assert_eq!(outcome.ended_by, fedrun_engine::RunEnd::EndRun);
///     assert_eq!(outcome.tasks_done, 0);
/// });
/// ```
#[derive(Clone)]
pub struct RunnerControl {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RunnerControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerControl")
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl RunnerControl {
    /// Ends the run as a server's `__end_run__` would (running tasks are aborted).
    pub fn end_run(&self) {
        log::info!("{} end of run requested", self.shared.prefix);
        self.shared.request_stop(RunEnd::EndRun);
    }

    /// Aborts the tasks running now, not the run (NVFlare's missing `abort_task`):
    /// their results become `TASK_ABORTED` and are sent as usual. Returns how many were running.
    pub fn abort_current_tasks(&self) -> usize {
        let Ok(running) = self.shared.running.lock() else {
            return 0;
        };
        for r in running.values() {
            log::info!(
                "{} aborting task {} ({:?})",
                self.shared.prefix,
                r.task.name,
                r.task.task_id
            );
            r.abort.trigger();
        }
        running.len()
    }

    /// The tasks being executed now.
    pub fn running_tasks(&self) -> Vec<RunningTask> {
        self.shared
            .running
            .lock()
            .map(|r| r.values().map(|r| r.task.clone()).collect())
            .unwrap_or_default()
    }

    /// Has the runner stopped (or been asked to)?
    pub fn is_stopped(&self) -> bool {
        self.shared.stop.is_triggered()
    }
}
