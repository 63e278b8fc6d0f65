//! The `TaskFetcher` actor: pulling tasks from the job's server and pushing their results.
//!
//! NVFlare's engine delegates `get_task_assignment` and `send_task_result` to
//! the client's `Communicator`, which talks to the server job on channel
//! `server_command` (topics `get_task` and `submit_update`). That communicator
//! keeps a little state between calls — the id of the last task received, a communication timeout
//! that the server may raise, the pending task — so in fedrun it is an actor that owns it.
//!
//! Client-side rules, as fedrun applies them:
//!
//! - **A pull succeeds only** when the cell reply is `ok` *and* its payload is a Shareable *and*
//!   that Shareable carries a peer context. Anything else is a failed pull (`Ok(None)`), never a
//!   crash. The special task names `__try_again__` and `__end_run__` come back as
//!   ordinary assignments; the runner interprets them.
//! - **Pull timeout** = `max(argument, communication timeout)`, or the communication timeout
//!   without an argument; **push timeout** = the argument, or the communication timeout without
//!   one (NVFlare's disagreement, kept for compatibility).
//! - A reply header `min_get_task_timeout` (seconds, a number or a numeric string) raises the
//!   communication timeout and never lowers it.
//! - A real task's `__task_id__` becomes `last_task_id`, sent with the next pull.
//! - **Events**: `_before_pull_task` is fired on the pull's context before the request leaves and
//!   `_after_pull_task` after the reply was applied, whatever the outcome (NVFlare's
//!   `fetch_task`). NVFlare fires `_after_pull_task` before it copies the server's peer context
//!   into the context; fedrun fires it after, so handlers see the same props plus the peer
//!   context (`__ssid__` is set in both when the pull succeeded, nothing else task-related is).
//! - **The pull's context comes back** with the assignment ([`TaskPull`]): it holds the server's
//!   peer context and `__ssid__`, and is the context to process the task in and to send its
//!   result with, as NVFlare's runner does with one `fl_ctx`.
//! - **Session id** (`ssid`, NVFlare's job SSID): a successful pull sets `__ssid__` (private,
//!   not sticky) in the pull's context; a push whose context carries another `__ssid__` (or none
//!   while the engine has one) is refused without sending — a warning "submit_update request
//!   failed because SSID mismatch" and the result is reported not sent (`invalid_session`),
//!   exactly NVFlare's `Communicator.submit_update`. A push without a context of its own gets a
//!   new context of the current session (stamped with the engine's ssid). NVFlare checks the
//!   session nowhere else in the client job: aux requests and pull replies are not checked
//!   (the server checks the cell header `ssid` that the wire layer adds).
//! - **Return codes** of task replies: only the cell code counts, and it must be present. A
//!   `get_task` or `submit_update` reply without `cn__return_code` is a failure (NVFlare reads
//!   the header without a default there; its own cells always set it, so only a foreign peer can
//!   omit it). The payload of a `submit_update` reply is not looked at: NVFlare's server job
//!   answers with an empty string payload and `ok`, which is success, and a Shareable reply
//!   without `__rc__` is success too. (Aux replies are different: there an absent cell code
//!   means `ok`, as NVFlare's aux runner reads it with that default.)
//! - **Hierarchical sites** pull from and push to their parent's job cell ([`config`]).
//!
//! # Concurrency: explicit in-flight state
//!
//! A pull awaits the cell and then mutates the fetcher's state. Pulls are therefore serialised by
//! a one-permit gate (a FIFO semaphore): a pull takes the permit, reads the state (`last_task_id`,
//! the timeout), sends, applies the reply to the state *inside the actor* and only then releases
//! the permit. Two concurrent pulls thus run one after the other, the second one sending the id
//! the first one recorded, and no update is lost. The mailbox itself is never blocked: result
//! pushes and [`GetFetcherState`] are served while a pull waits for its reply (which may take the
//! whole communication timeout, 300 s by default).

use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, MessageResult, Recipient,
    ResponseActFuture, WrapFuture,
};
use fedrun_cell::{header, AbortSignal, CellHandle, CellMessage, Fqcn, SendRequest};
use fedrun_core::constants::{channel, event_type, fl_ctx_key, header_key, task_header, topic};
use fedrun_core::peer_context::MASK_PRIVATE;
use fedrun_core::{
    AppReturnCode, CellReturnCode, FlContext, Map, PeerContext, Shareable, TaskAssignment, Value,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::EngineError;
use crate::registry::FireEvent;
use crate::run_info::{GetAbortSignal, NewContext, RunInfo, SetCurrentTask};

pub mod config;
mod push;

pub use push::{OfferTaskResult, SendTaskResult, OFFERED_REFS_HEADER};

pub use config::{
    parent_site_name, TaskFetcherConfig, DEFAULT_COMMUNICATION_TIMEOUT, DEFAULT_PROJECT_NAME,
    DEFAULT_TASK_FETCHER_MAILBOX,
};

/// The actor that pulls tasks from the server job and pushes their results (see the module doc).
///
/// # Example
/// ```
/// use std::time::Duration;
/// use actix::Actor;
/// use fedrun_cell::{request_handler, Cell, CellMessage, Fqcn, Network};
/// use fedrun_core::{PeerContext, Shareable};
/// use fedrun_engine::{GetTaskAssignment, RunInfo, RunInfoConfig, TaskFetcher, TaskFetcherConfig};
///
/// actix::System::new().block_on(async {
///     let net = Network::new();
///     // A server job that always hands out task "train" with id "t-1".
///     let server = Cell::start(Fqcn::job_cell("server", "job-1").unwrap(), net.clone()).unwrap();
///     let get_task = request_handler(|_req: CellMessage| async move {
///         let mut task = Shareable::new();
///         task.set_header("task_name", "train");
///         task.set_header("__task_id__", "t-1");
///         let mut server_ctx = PeerContext::default();
///         server_ctx.set("__run_num__", "job-1");
///         server_ctx.set("__identity_name__", "server");
///         task.set_peer_context(server_ctx);
///         Ok(Some(CellMessage::new(task)))
///     });
///     server.register_request_handler("server_command", "get_task", get_task).await.unwrap();
///
///     let run = RunInfo::new(RunInfoConfig::new("site-1", "job-1")).start();
///     let cell = Cell::start(Fqcn::job_cell("site-1", "job-1").unwrap(), net.clone()).unwrap();
///     let fetcher = TaskFetcher::new(TaskFetcherConfig::new("site-1", "job-1", cell, run))
///         .unwrap()
///         .start();
///     let pull = GetTaskAssignment { ctx: None, timeout: Some(Duration::from_secs(5)) };
///     let pulled = fetcher.send(pull).await.unwrap().unwrap();
///     // The pull's context holds the server's peer context: process the task in it.
///     assert!(pulled.ctx.peer_context().is_some());
///     let task = pulled.task.expect("a task");
///     assert_eq!(task.name, "train");
///     assert_eq!(task.task_id.as_deref(), Some("t-1"));
/// });
/// ```
pub struct TaskFetcher {
    site: String,
    job_id: String,
    cell: CellHandle,
    run_info: Addr<RunInfo>,
    /// `<parent_fqcn>.<job_id>`.
    target: Fqcn,
    project_name: String,
    mailbox_capacity: usize,
    /// The current communication timeout: raised by `min_get_task_timeout`, never lowered.
    communication_timeout: Duration,
    /// The id of the last real task received (sent as `last_task_id` with the next pull).
    last_task_id: Option<String>,
    /// The id of the task received and not yet answered (cleared when a result is pushed).
    pending_task_id: Option<String>,
    /// One pull at a time (see the module doc).
    pull_gate: Arc<Semaphore>,
    /// The run's abort signal, fetched from [`RunInfo`] at start; it ends a waiting pull.
    abort: AbortSignal,
    /// The job's session id (see the module doc).
    ssid: Option<String>,
    /// Where the pull events are fired.
    events: Option<Recipient<FireEvent>>,
    /// Where result arrays are offered for download, if results carry references.
    downloads: Option<crate::download::DownloadHandle>,
}

impl TaskFetcher {
    /// A fetcher for `config` (not started; call `.start()`).
    ///
    /// # Errors
    ///
    /// [`EngineError::InvalidTargetFqcn`] when `<parent_fqcn>.<job_id>` is not a valid cell name.
    pub fn new(config: TaskFetcherConfig) -> Result<Self, EngineError> {
        let name = format!("{}.{}", config.parent_fqcn, config.job_id);
        let target = Fqcn::new(name.clone()).map_err(|e| EngineError::InvalidTargetFqcn {
            fqcn: name,
            reason: e.to_string(),
        })?;
        Ok(TaskFetcher {
            site: config.client_name,
            job_id: config.job_id,
            cell: config.cell,
            run_info: config.run_info,
            target,
            project_name: config.project_name,
            mailbox_capacity: config.mailbox_capacity.max(1),
            communication_timeout: config.communication_timeout,
            last_task_id: None,
            pending_task_id: None,
            pull_gate: Arc::new(Semaphore::new(1)),
            abort: AbortSignal::new(),
            ssid: config.ssid,
            events: config.events,
            downloads: config.downloads,
        })
    }

    fn prefix(&self) -> String {
        format!("[job={} site={}] TaskFetcher", self.job_id, self.site)
    }

    fn cell_error(&self, reason: String) -> EngineError {
        EngineError::CellUnavailable {
            fqcn: self.cell.fqcn().to_string(),
            reason,
        }
    }

    /// The `get_task` request, built from the state as it is now (the caller holds the gate).
    fn pull_request(&self, ctx: &FlContext, timeout: Option<Duration>) -> SendRequest {
        let mut request = Shareable::new();
        request.set_peer_context(ctx.to_peer_context());
        if let Some(id) = &self.last_task_id {
            request.set_header(task_header::LAST_TASK_ID, id.as_str());
        }
        let timeout = match timeout {
            Some(t) => t.max(self.communication_timeout),
            None => self.communication_timeout,
        };
        let message = CellMessage::new(request)
            .with_header(task_header::PROJECT_NAME, self.project_name.as_str());
        log::debug!(
            "{} pulls a task from {} (timeout {timeout:?}, last_task_id {:?})",
            self.prefix(),
            self.target,
            self.last_task_id
        );
        SendRequest::new(
            channel::SERVER_COMMAND,
            topic::GET_TASK,
            self.target.clone(),
            message,
            timeout,
        )
        .with_optional(true)
        .with_abort(self.abort.clone())
    }

    /// Raises the communication timeout to the reply's `min_get_task_timeout`, if larger.
    fn apply_min_timeout(&mut self, task: &Shareable) {
        let Some(raw) = task.header_or_none(task_header::MIN_GET_TASK_TIMEOUT) else {
            return;
        };
        let secs = match raw {
            Value::Str(s) => s.trim().parse::<f64>().ok(),
            other => other.as_f64(),
        };
        let Some(wanted) = secs.and_then(|s| Duration::try_from_secs_f64(s).ok()) else {
            log::warn!(
                "{} ignoring min_get_task_timeout {raw:?}: not a non-negative number of seconds",
                self.prefix()
            );
            return;
        };
        if wanted > self.communication_timeout {
            log::info!(
                "{} communication timeout raised from {:?} to {wanted:?} (min_get_task_timeout)",
                self.prefix(),
                self.communication_timeout
            );
            self.communication_timeout = wanted;
        }
    }

    /// Turns a `get_task` reply into an assignment (or a failed pull) and updates the state.
    fn apply_pull_reply(
        &mut self,
        reply: CellMessage,
        ctx: &mut FlContext,
    ) -> Option<TaskAssignment> {
        let prefix = self.prefix();
        let Some(code) = reply.headers.return_code() else {
            log::warn!(
                "{prefix} get_task reply from {} has no cn__return_code; failed pull, will try \
                 it again",
                self.target
            );
            return None;
        };
        if !code.is_ok() {
            let detail = reply.headers.error().unwrap_or("no detail");
            if code == CellReturnCode::AuthenticationError {
                log::warn!("{prefix} get_task not authenticated: {code} ({detail})");
            } else {
                log::warn!("{prefix} get_task failed: {code} ({detail}); will try it again");
            }
            return None;
        }
        let Some(mut task) = reply.payload.into_shareable() else {
            log::error!(
                "{prefix} get_task reply is ok but its payload is not a Shareable; failed pull"
            );
            return None;
        };
        self.apply_min_timeout(&task);
        // NVFlare stamps the session on every ok pull, special task names included.
        if let Some(ssid) = &self.ssid {
            ctx.put(fl_ctx_key::SSID, ssid.as_str(), true, false);
        }
        let name = [task_header::TASK_NAME, header_key::TASK_NAME]
            .iter()
            .find_map(|k| task.header_or_none(k).and_then(Value::as_str))
            .map(str::to_owned);
        let Some(name) = name else {
            log::warn!("{prefix} get_task reply has no task name; failed pull");
            return None;
        };
        let Some(peer) = task.peer_context().cloned() else {
            log::warn!("{prefix} task {name} arrived without a peer context; failed pull");
            return None;
        };
        task.set_peer_props(public_props(&peer));
        ctx.set_peer_context(peer);
        let assignment = TaskAssignment::from_task(&name, task);
        if !assignment.is_try_again() && !assignment.is_end_run() {
            self.last_task_id.clone_from(&assignment.task_id);
            self.pending_task_id.clone_from(&assignment.task_id);
            log::debug!(
                "{prefix} received task {name} (id {:?})",
                assignment.task_id
            );
        } else {
            log::debug!("{prefix} server answered {name}");
        }
        Some(assignment)
    }

    /// NVFlare's session check of `submit_update`: the context's `__ssid__` must equal the
    /// engine's ssid (both absent counts as equal).
    fn session_matches(&self, ctx: &FlContext) -> bool {
        let in_ctx = match ctx.get_prop(fl_ctx_key::SSID) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        };
        if in_ctx.as_deref() == self.ssid.as_deref() {
            return true;
        }
        log::warn!(
            "{} submit_update request failed because SSID mismatch (context {in_ctx:?}, job \
             session {:?})",
            self.prefix(),
            self.ssid
        );
        false
    }

    /// The `submit_update` request for `result` (the state's pending task is cleared).
    fn push_request(
        &mut self,
        mut result: Shareable,
        task_name: Option<String>,
        ctx: &FlContext,
        timeout: Option<Duration>,
    ) -> SendRequest {
        self.pending_task_id = None;
        let task_name = task_name
            .or_else(|| {
                result
                    .header_or_none(header_key::TASK_NAME)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .or_else(|| match ctx.get_prop(fl_ctx_key::TASK_NAME) {
                Some(Value::Str(s)) => Some(s),
                _ => None,
            });
        match &task_name {
            Some(name) => result.set_header(header_key::TASK_NAME, name.as_str()),
            None => log::warn!(
                "{} result has no task name (argument, header or context)",
                self.prefix()
            ),
        }
        result.set_peer_context(ctx.to_peer_context());
        let optional = result.return_code().as_str() == AppReturnCode::TaskAborted.as_str();
        let root_id = result
            .header_or_none(header_key::MSG_ROOT_ID)
            .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
            .cloned();
        let root_ttl = result
            .header_or_none(header_key::MSG_ROOT_TTL)
            .filter(|v| v.as_f64().is_some_and(|t| t > 0.0))
            .cloned();
        // offered before (OfferTaskResult), or now
        let refs = match result.remove_header(push::OFFERED_REFS_HEADER) {
            Some(refs) => Some(refs),
            None => self.downloads.as_ref().and_then(|d| d.offer(&mut result)),
        };
        let mut message = CellMessage::new(result)
            .with_header(task_header::PROJECT_NAME, self.project_name.as_str());
        if let Some(refs) = refs {
            message.headers.insert(header::DOWNLOAD_REFS, refs);
        }
        if let Some(id) = root_id {
            message.headers.insert(header::MSG_ROOT_ID, id);
        }
        if let Some(ttl) = root_ttl {
            message.headers.insert(header::MSG_ROOT_TTL, ttl);
        }
        let timeout = match timeout {
            Some(t) if !t.is_zero() => t,
            _ => self.communication_timeout,
        };
        log::debug!(
            "{} pushes the result of task {task_name:?} to {} (timeout {timeout:?}, optional \
             {optional})",
            self.prefix(),
            self.target
        );
        SendRequest::new(
            channel::SERVER_COMMAND,
            topic::SUBMIT_UPDATE,
            self.target.clone(),
            message,
            timeout,
        )
        .with_optional(optional)
    }
}

/// The public props of a peer context, as the `__peer_props__` header carries them.
fn public_props(peer: &PeerContext) -> Map {
    peer.props
        .iter()
        .filter(|(_, p)| p.mask & MASK_PRIVATE == 0)
        .map(|(k, p)| (k.as_str(), p.value.clone()))
        .collect()
}

impl Actor for TaskFetcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
        let run_info = self.run_info.clone();
        // Wait, not spawn: no pull starts before the run's abort signal is known.
        ctx.wait(
            async move { run_info.send(GetAbortSignal).await }
                .into_actor(self)
                .map(|abort, act, _ctx| match abort {
                    Ok(signal) => act.abort = signal,
                    Err(e) => log::warn!(
                        "{} no abort signal from RunInfo ({e}); pulls cannot be aborted with the \
                         run",
                        act.prefix()
                    ),
                }),
        );
        log::debug!(
            "{} started: server job {}, communication timeout {:?}",
            self.prefix(),
            self.target,
            self.communication_timeout
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        log::debug!("{} stopped", self.prefix());
    }
}

/// A context from `ctx`, or a new one from the run.
async fn context_or_new(
    ctx: Option<FlContext>,
    run_info: Addr<RunInfo>,
) -> Result<FlContext, EngineError> {
    match ctx {
        Some(ctx) => Ok(ctx),
        None => run_info
            .send(NewContext)
            .await
            .map_err(|_| EngineError::ActorGone { actor: "RunInfo" }),
    }
}

/// Sets or clears the run's current task name, waiting for `RunInfo` so that a caller who then
/// asks for the run info sees the change.
async fn set_current_task(run_info: Addr<RunInfo>, name: Option<String>, prefix: String) {
    if let Err(e) = run_info.send(SetCurrentTask { name }).await {
        log::warn!("{prefix} cannot update the current task name in RunInfo: {e}");
    }
}

/// Fires `event` on `ctx` through `events` and returns the context the handlers left; on a
/// failure of the fan-out (too deep) the context is kept as it was and the failure logged.
async fn fire_pull_event(
    events: Option<Recipient<FireEvent>>,
    event: &'static str,
    ctx: FlContext,
    prefix: &str,
) -> FlContext {
    let Some(events) = events else {
        return ctx;
    };
    let fired = events.send(FireEvent {
        event_type: event.to_owned(),
        ctx: ctx.clone(),
    });
    match fired.await {
        Ok(Ok(ctx)) => ctx,
        Ok(Err(e)) => {
            log::warn!("{prefix} event {event} not fired: {e}");
            ctx
        }
        Err(e) => {
            log::warn!("{prefix} event {event} not fired: the registry is gone ({e})");
            ctx
        }
    }
}

/// The outcome of one pull: the assignment (or none) and the context the pull ran in.
#[derive(Debug, Clone)]
pub struct TaskPull {
    /// The assignment; `None` for a failed pull (try again later).
    pub task: Option<TaskAssignment>,
    /// The pull's context, as `_after_pull_task`'s handlers left it: after a successful pull it
    /// carries `__ssid__` (when the engine has a session id) and, when a task arrived, the
    /// server's peer context (`__peer_ctx__`). Process the task in it and send its result with
    /// it ([`SendTaskResult::with_ctx`]).
    pub ctx: FlContext,
}

/// NVFlare's `get_task_assignment(fl_ctx, timeout)`: pulls one task.
///
/// Replies a [`TaskPull`]: `task: Some(..)` on a successful pull — a real task, or the special
/// names `__try_again__` / `__end_run__` — and `task: None` on a failed pull (any cell code but
/// `ok`, no cell code, a payload that is not a Shareable, a reply without a task name or peer
/// context); in both cases the pull's context. A real task becomes the run's current task
/// ([`SetCurrentTask`]). Its data carries the server's `__peer_ctx__` and, in `__peer_props__`,
/// that context's public props. `_before_pull_task` and `_after_pull_task` are fired around the
/// pull when the fetcher has an event sink.
///
/// Errors: [`EngineError::ActorGone`] when `ctx` is `None` and `RunInfo` is gone;
/// [`EngineError::CellUnavailable`] when the job's own cell is stopped.
#[derive(Debug, Message)]
#[rtype(result = "Result<TaskPull, EngineError>")]
pub struct GetTaskAssignment {
    /// The context whose public props go to the server; `None`: a new context of the run.
    pub ctx: Option<FlContext>,
    /// The wished timeout; the communication timeout applies when it is larger or when `None`.
    pub timeout: Option<Duration>,
}

impl Handler<GetTaskAssignment> for TaskFetcher {
    type Result = ResponseActFuture<Self, Result<TaskPull, EngineError>>;

    fn handle(&mut self, msg: GetTaskAssignment, _ctx: &mut Context<Self>) -> Self::Result {
        log::debug!("{} handles GetTaskAssignment", self.prefix());
        let gate = Arc::clone(&self.pull_gate);
        let run_info = self.run_info.clone();
        let events = self.events.clone();
        let prefix = self.prefix();
        let GetTaskAssignment { ctx, timeout } = msg;
        let admitted = async move {
            // The gate is never closed, so acquiring only fails if that changes; then the pull
            // runs ungated rather than not at all.
            let permit: Option<OwnedSemaphorePermit> = gate.acquire_owned().await.ok();
            let ctx = match context_or_new(ctx, run_info).await {
                Ok(ctx) => ctx,
                Err(e) => return (permit, Err(e)),
            };
            let ctx = fire_pull_event(events, event_type::BEFORE_PULL_TASK, ctx, &prefix).await;
            (permit, Ok(ctx))
        };
        let pull = admitted
            .into_actor(self)
            .then(move |(permit, ctx), act, _| {
                let request = ctx.map(|ctx| (act.pull_request(&ctx, timeout), ctx));
                let cell = act.cell.clone();
                async move {
                    let (request, ctx) = request?;
                    let reply = cell.send_request(request).await;
                    Ok::<_, EngineError>((reply, ctx))
                }
                .into_actor(act)
                .map(move |sent, act, _| {
                    let (reply, mut ctx) = sent?;
                    let reply = reply.map_err(|e| act.cell_error(e.to_string()))?;
                    let task = act.apply_pull_reply(reply, &mut ctx);
                    // State updated: the next pull may start.
                    drop(permit);
                    Ok::<_, EngineError>((task, ctx))
                })
            })
            .then(|outcome, act, _| {
                let run_info = act.run_info.clone();
                let events = act.events.clone();
                let prefix = act.prefix();
                async move {
                    let (task, ctx) = outcome?;
                    let ctx =
                        fire_pull_event(events, event_type::AFTER_PULL_TASK, ctx, &prefix).await;
                    if let Some(t) = task
                        .as_ref()
                        .filter(|t| !t.is_try_again() && !t.is_end_run())
                    {
                        set_current_task(run_info, Some(t.name.clone()), prefix).await;
                    }
                    Ok(TaskPull { task, ctx })
                }
                .into_actor(act)
            });
        Box::pin(pull)
    }
}

/// What a [`TaskFetcher`] holds now (for tests and diagnostics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetcherState {
    /// The id of the last real task received.
    pub last_task_id: Option<String>,
    /// The id of the task received and not yet answered.
    pub pending_task_id: Option<String>,
    /// The current communication timeout.
    pub communication_timeout: Duration,
}

/// Asks a [`TaskFetcher`] for its [`FetcherState`].
#[derive(Debug, Clone, Message)]
#[rtype(result = "FetcherState")]
pub struct GetFetcherState;

impl Handler<GetFetcherState> for TaskFetcher {
    type Result = MessageResult<GetFetcherState>;

    fn handle(&mut self, _msg: GetFetcherState, _ctx: &mut Context<Self>) -> Self::Result {
        log::debug!("{} handles GetFetcherState", self.prefix());
        MessageResult(FetcherState {
            last_task_id: self.last_task_id.clone(),
            pending_task_id: self.pending_task_id.clone(),
            communication_timeout: self.communication_timeout,
        })
    }
}
