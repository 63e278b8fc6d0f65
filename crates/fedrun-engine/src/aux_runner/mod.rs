//! The `AuxRunner` actor: aux messages in and out of the job, and the job's client directory.
//!
//! Aux messages are the job processes' side channel (channel `aux_communication`, one topic per
//! purpose): the server syncs and checks on the client runner with them, components exchange
//! their own messages, and the object streamer rides on them. NVFlare's `AuxRunner` plus the
//! target/directory parts of `ClientRunManager` become one
//! actor that owns:
//!
//! - the aux handlers by topic ([`RegisterAuxMessageHandler`]; no replacement, no wildcard);
//! - the job clients loaded from the job meta ([`GetJobClients`], swapped atomically) and
//!   the queries on them ([`ValidateTargets`], [`GetClientFromName`], [`GetClients`]);
//! - the one cell request handler (channel `aux_communication`, topic `*`) through which every
//!   incoming aux message reaches [`DispatchAuxRequest`] (its doc lists the checks, in order);
//! - outgoing requests: [`SendAuxRequest`] (unicast / broadcast), [`MulticastAuxRequests`] (a
//!   different request per target, which works with a timeout unlike NVFlare) and
//!   [`FireAndForgetAuxRequest`].
//!
//! Target names follow one rule everywhere (see [`AuxTargets`]); an unknown name fails before
//! anything is sent. Nothing here blocks the mailbox: incoming messages run their handler, and
//! outgoing requests wait for their replies, in futures outside the actor.

mod dispatch;
mod send;
mod targets;

use std::collections::HashMap;
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, Addr, AsyncContext, AtomicResponse, Context, Handler, Message,
    MessageResult, ResponseFuture, WeakAddr, WrapFuture,
};
use fedrun_cell::cell::WILDCARD;
use fedrun_cell::{
    request_handler, AbortSignal, CellHandle, CellMessage, FireAndForget, Fqcn, HandlerError,
    Payload, RequestHandler, SendMultiRequest,
};
use fedrun_core::constants::{channel, config_var, fl_ctx_key, process_type};
use fedrun_core::{
    parse_job_clients, AuxMsgTarget, CellReturnCode, Client, FlContext, Shareable, Value,
};

use crate::error::EngineError;
use crate::run_info::{GetAbortSignal, ReportError, RunInfo};
use dispatch::DispatchEnv;
use targets::Directory;

pub use dispatch::{
    aux_handler, AuxHandler, AuxHandlerFn, AuxRequest, AUX_ERROR_GROUP, AUX_ERROR_KEY,
};
pub use send::aux_timeout_secs;
pub use targets::{AuxTargets, SERVER_PARENT_KEY};

/// The channel of every aux message.
pub const AUX_CHANNEL: &str = channel::AUX_COMMUNICATION;

/// The default mailbox capacity of the [`AuxRunner`] actor.
pub const DEFAULT_AUX_MAILBOX: usize = 256;

/// The default of [`AuxConfig::cell_wait_timeout`]: NVFlare's `cell_wait_timeout` (5 s).
pub const DEFAULT_CELL_WAIT_TIMEOUT: Duration =
    Duration::from_secs(config_var::CELL_WAIT_TIMEOUT_DEFAULT as u64);

/// What an [`AuxRunner`] is built from.
///
/// # Example
/// ```
/// use actix::Actor;
/// use fedrun_cell::{Cell, Fqcn, Network};
/// use fedrun_engine::{AuxConfig, RunInfo, RunInfoConfig};
///
/// actix::System::new().block_on(async {
///     let run = RunInfo::new(RunInfoConfig::new("site-1", "job-1")).start();
///     let cell = Cell::start(Fqcn::job_cell("site-1", "job-1").unwrap(), Network::new()).unwrap();
///     let config = AuxConfig::new("site-1", "job-1", cell, run).with_check_run_mismatch(true);
///     assert_eq!(config.process_type, "CJ");
///     assert!(config.check_run_mismatch);
/// });
/// ```
#[derive(Clone, Debug)]
pub struct AuxConfig {
    /// This site's name (excluded from `@ALL`).
    pub client_name: String,
    /// The job this engine runs (appended to job-scoped target cells).
    pub job_id: String,
    /// The job's cell: incoming aux messages arrive there, outgoing ones leave from it.
    pub cell: CellHandle,
    /// The run: new contexts, the error log and the abort signal.
    pub run_info: Addr<RunInfo>,
    /// `CJ` for a client job (the default); `SJ`, `CP`, `SP` for the other processes.
    pub process_type: String,
    /// How long the cell may take to accept the handler registration at start and each
    /// fire-and-forget message.
    pub cell_wait_timeout: Duration,
    /// Answer `RUN_MISMATCH` to peers whose `__run_num__` is absent or another job's (off by
    /// default because NVFlare parent processes send no job id).
    pub check_run_mismatch: bool,
    /// The actor's mailbox capacity.
    pub mailbox_capacity: usize,
}

impl AuxConfig {
    /// A client-job config with the defaults: process type `CJ`, a 5 s cell wait, no run-mismatch
    /// check, a mailbox of [`DEFAULT_AUX_MAILBOX`].
    pub fn new(
        client_name: impl Into<String>,
        job_id: impl Into<String>,
        cell: CellHandle,
        run_info: Addr<RunInfo>,
    ) -> Self {
        AuxConfig {
            client_name: client_name.into(),
            job_id: job_id.into(),
            cell,
            run_info,
            process_type: process_type::CLIENT_JOB.to_owned(),
            cell_wait_timeout: DEFAULT_CELL_WAIT_TIMEOUT,
            check_run_mismatch: false,
            mailbox_capacity: DEFAULT_AUX_MAILBOX,
        }
    }

    /// Sets the process type (`CJ`, `SJ`, `CP`, `SP`).
    pub fn with_process_type(mut self, process_type: impl Into<String>) -> Self {
        self.process_type = process_type.into();
        self
    }

    /// Sets the cell wait timeout.
    pub fn with_cell_wait_timeout(mut self, timeout: Duration) -> Self {
        self.cell_wait_timeout = timeout;
        self
    }

    /// Turns the run-mismatch check on or off.
    pub fn with_check_run_mismatch(mut self, check: bool) -> Self {
        self.check_run_mismatch = check;
        self
    }

    /// Sets the mailbox capacity (at least 1).
    pub fn with_mailbox_capacity(mut self, capacity: usize) -> Self {
        self.mailbox_capacity = capacity;
        self
    }
}

/// The actor that sends, receives and dispatches the job's aux messages (see the module doc).
///
/// # Example
/// ```
/// use std::time::Duration;
/// use actix::Actor;
/// use fedrun_cell::{Cell, Fqcn, Network};
/// use fedrun_core::{Map, Shareable, Value};
/// use fedrun_engine::{
///     aux_handler, AuxConfig, AuxRunner, GetJobClients, RegisterAuxMessageHandler, RunInfo,
///     RunInfoConfig, SendAuxRequest,
/// };
///
/// actix::System::new().block_on(async {
///     let net = Network::new();
///     let clients: Vec<Value> = ["site-1", "site-2"]
///         .iter()
///         .map(|n| Value::from(Map::from_iter([("name", *n)])))
///         .collect();
///     let meta = Value::from(Map::from_iter([("job_clients", clients)]));
///     let mut runners = Vec::new();
///     for site in ["site-1", "site-2"] {
///         let run = RunInfo::new(RunInfoConfig::new(site, "job-1").with_job_meta(meta.clone()))
///             .start();
///         let cell = Cell::start(Fqcn::job_cell(site, "job-1").unwrap(), net.clone()).unwrap();
///         let aux = AuxRunner::new(AuxConfig::new(site, "job-1", cell, run)).start();
///         aux.send(GetJobClients { job_meta: None }).await.unwrap().unwrap();
///         runners.push(aux);
///     }
///     let hello = aux_handler(|req| async move {
///         let mut reply = Shareable::new();
///         reply.insert("answered_by", req.ctx.identity_name());
///         Ok(reply)
///     });
///     runners[1]
///         .send(RegisterAuxMessageHandler::new("hello", hello))
///         .await
///         .unwrap()
///         .unwrap();
///     let request = SendAuxRequest::new("site-2", "hello", Shareable::new(),
///                                       Duration::from_secs(5));
///     let replies = runners[0].send(request).await.unwrap().unwrap();
///     assert_eq!(replies["site-2"].get("answered_by").and_then(Value::as_str), Some("site-2"));
/// });
/// ```
pub struct AuxRunner {
    site: String,
    job_id: String,
    cell: CellHandle,
    run_info: Addr<RunInfo>,
    process_type: String,
    cell_wait_timeout: Duration,
    check_run_mismatch: bool,
    mailbox_capacity: usize,
    handlers: HashMap<String, AuxHandler>,
    directory: Option<Directory>,
    /// The run's abort signal, fetched from [`RunInfo`] at start (before any message is handled).
    abort: AbortSignal,
}

impl AuxRunner {
    /// An aux runner for `config` (not started; call `.start()`).
    pub fn new(config: AuxConfig) -> Self {
        AuxRunner {
            site: config.client_name,
            job_id: config.job_id,
            cell: config.cell,
            run_info: config.run_info,
            process_type: config.process_type,
            cell_wait_timeout: config.cell_wait_timeout,
            check_run_mismatch: config.check_run_mismatch,
            mailbox_capacity: config.mailbox_capacity.max(1),
            handlers: HashMap::new(),
            directory: None,
            abort: AbortSignal::new(),
        }
    }

    /// `what` is formatted only when debug logging is on: pass `format_args!(..)`, not `format!`,
    /// so the hot path allocates nothing for a line nobody reads.
    fn log_handling(&self, what: impl std::fmt::Display) {
        log::debug!(
            "[job={} site={}] AuxRunner handles {what}",
            self.job_id,
            self.site
        );
    }

    fn env(&self) -> DispatchEnv {
        DispatchEnv {
            job_id: self.job_id.clone(),
            site: self.site.clone(),
            run_info: self.run_info.clone(),
            abort: self.abort.clone(),
            check_run_mismatch: self.check_run_mismatch,
        }
    }

    /// Names and cells of `targets`, failing before anything is sent.
    fn plan(&self, targets: Vec<AuxMsgTarget>) -> Result<Vec<(String, Fqcn)>, EngineError> {
        targets
            .into_iter()
            .map(|t| {
                let fqcn = targets::target_fqcn(&t, &self.process_type, &self.job_id)?;
                Ok((t.name, fqcn))
            })
            .collect()
    }

    fn outbound(&self, topic: String, timeout: Duration, optional: bool, secure: bool) -> Outbound {
        Outbound {
            env: self.env(),
            cell: self.cell.clone(),
            cell_wait_timeout: self.cell_wait_timeout,
            topic,
            timeout,
            optional,
            secure,
        }
    }
}

/// The cell request handler that hands every aux message to the runner. It holds a weak address
/// so that the cell does not keep a stopped runner alive (the runner holds the cell).
fn cell_handler(runner: WeakAddr<AuxRunner>) -> RequestHandler {
    request_handler(move |msg: CellMessage| {
        let runner = runner.upgrade();
        async move {
            let Some(runner) = runner else {
                return Err(HandlerError::ServiceUnavailable);
            };
            let request = DispatchAuxRequest {
                topic: msg.headers.topic().unwrap_or_default().to_owned(),
                origin: msg.headers.origin().unwrap_or_default().to_owned(),
                request: msg.payload,
            };
            match runner.send(request).await {
                Ok(reply) => Ok(Some(CellMessage::new(reply))),
                Err(_) => Err(HandlerError::ServiceUnavailable),
            }
        }
    })
}

impl Actor for AuxRunner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
        let handler = cell_handler(ctx.address().downgrade());
        let cell = self.cell.clone();
        let run_info = self.run_info.clone();
        let wait = self.cell_wait_timeout;
        let setup = async move {
            let registered = tokio::time::timeout(
                wait,
                cell.register_request_handler(AUX_CHANNEL, WILDCARD, handler),
            )
            .await
            .map_err(|_| format!("the cell did not accept the handler within {wait:?}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
            let abort = run_info.send(GetAbortSignal).await;
            (registered, abort)
        };
        // Wait, not spawn: no message is handled before the handler is registered and the run's
        // abort signal is known.
        ctx.wait(
            setup
                .into_actor(self)
                .map(|(registered, abort), act, _ctx| {
                    match abort {
                        Ok(signal) => act.abort = signal,
                        Err(e) => log::warn!(
                            "[job={} site={}] AuxRunner: no abort signal from RunInfo ({e}); \
                     requests cannot be aborted with the run",
                            act.job_id,
                            act.site
                        ),
                    }
                    match registered {
                        Ok(()) => log::debug!(
                            "[job={} site={}] AuxRunner serving {AUX_CHANNEL}/* on cell {}",
                            act.job_id,
                            act.site,
                            act.cell.fqcn()
                        ),
                        Err(e) => {
                            let message = format!(
                        "cannot register the aux handler on cell {}: {e}; incoming aux messages \
                         will not be served",
                        act.cell.fqcn()
                    );
                            log::error!(
                                "[job={} site={}] AuxRunner: {message}",
                                act.job_id,
                                act.site
                            );
                            // Loss acceptable: the error is logged above; the report is a convenience.
                            act.run_info.do_send(ReportError {
                                group: AUX_ERROR_GROUP.to_owned(),
                                key: AUX_ERROR_KEY.to_owned(),
                                message,
                            });
                        }
                    }
                }),
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        log::debug!("[job={} site={}] AuxRunner stopped", self.job_id, self.site);
    }
}

/// Registers the handler of one aux topic.
///
/// Replies [`EngineError::EmptyTopic`] for an empty topic (whitespace is accepted) and
/// [`EngineError::DuplicateAuxHandler`] when the topic already has a handler (no replacement).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct RegisterAuxMessageHandler {
    /// The aux topic.
    pub topic: String,
    /// Its handler.
    pub handler: AuxHandler,
}

impl RegisterAuxMessageHandler {
    /// A registration of `handler` (a function from [`aux_handler`] or an actor's recipient).
    pub fn new(topic: impl Into<String>, handler: impl Into<AuxHandler>) -> Self {
        RegisterAuxMessageHandler {
            topic: topic.into(),
            handler: handler.into(),
        }
    }
}

impl Handler<RegisterAuxMessageHandler> for AuxRunner {
    type Result = Result<(), EngineError>;

    fn handle(&mut self, msg: RegisterAuxMessageHandler, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling(format_args!("RegisterAuxMessageHandler({:?})", msg.topic));
        if msg.topic.is_empty() {
            return Err(EngineError::EmptyTopic);
        }
        if self.handlers.contains_key(&msg.topic) {
            return Err(EngineError::DuplicateAuxHandler(msg.topic));
        }
        log::info!(
            "[job={} site={}] AuxRunner: registered aux handler for topic {}",
            self.job_id,
            self.site,
            msg.topic
        );
        self.handlers.insert(msg.topic, msg.handler);
        Ok(())
    }
}

/// One incoming aux message (what the cell handler sends; NVFlare's `dispatch`).
///
/// Replies with the Shareable to send back: the handler's reply, or an error reply whose return
/// code says which check failed. Never fails; the handler runs outside the mailbox. Checks, in
/// order:
///
/// 1. the payload is not a Shareable → `BAD_REQUEST_DATA`;
/// 2. peer props present but not a map → `BAD_PEER_CONTEXT` (NVFlare crashes instead);
/// 3. no handler for the topic → `TOPIC_UNKNOWN`;
/// 4. peer props missing or empty → `MISSING_PEER_CONTEXT`;
/// 5. only with [`AuxConfig::check_run_mismatch`]: the peer's `__run_num__` absent or
///    another job's → `RUN_MISMATCH`;
/// 6. the handler fails, panics, or its actor is gone → `HANDLER_EXCEPTION` (the runner keeps
///    serving);
/// 7. otherwise the handler's reply.
///
/// Each failure is logged with job, site, topic and origin, and reported to the run
/// ([`ReportError`] in group [`AUX_ERROR_GROUP`], key [`AUX_ERROR_KEY`]). The request's cookie
/// jar, when non-empty, is copied onto the reply (error replies too), and the reply gets this
/// site's public props as its peer context unless the handler set one.
#[derive(Debug, Message)]
#[rtype(result = "Shareable")]
pub struct DispatchAuxRequest {
    /// The aux topic (the cell message's `cn__topic`).
    pub topic: String,
    /// The cell payload (normally a Shareable).
    pub request: Payload,
    /// The sender's cell (`cn__origin`), for logs.
    pub origin: String,
}

impl Handler<DispatchAuxRequest> for AuxRunner {
    type Result = ResponseFuture<Shareable>;

    fn handle(&mut self, msg: DispatchAuxRequest, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling(format_args!(
            "DispatchAuxRequest(topic {:?} from {:?})",
            msg.topic, msg.origin
        ));
        let handler = self.handlers.get(&msg.topic).cloned();
        Box::pin(dispatch::dispatch(
            self.env(),
            handler,
            msg.topic,
            msg.request,
            msg.origin,
        ))
    }
}

/// The replies of an aux send: target name (`"server"`, `"server_parent"`, client names) →
/// reply. Empty for fire-and-forget.
pub type AuxReplies = HashMap<String, Shareable>;

/// Sends one request to one or more targets.
///
/// The request gets `__topic__` and `__peer_props__` (the public props of `ctx`, or of a new
/// context of the run); its message-root and pass-through headers are copied to the cell
/// message. A zero `timeout` is fire-and-forget (`secure` kept) and replies an empty map; any
/// other waits for every reply (or the run's abort) and converts them.
///
/// Errors, before anything is sent: [`EngineError::EmptyTopic`], [`EngineError::UnknownTarget`],
/// [`EngineError::JobClientsNotLoaded`] (`@ALL`), [`EngineError::InvalidProcessType`],
/// [`EngineError::InvalidTargetFqcn`]; and [`EngineError::CellUnavailable`].
///
/// # Example
/// ```
/// use std::time::Duration;
/// use fedrun_core::Shareable;
/// use fedrun_engine::{AuxTargets, SendAuxRequest};
///
/// let req = SendAuxRequest::new("@ALL", "hello", Shareable::new(), Duration::from_secs(2))
///     .with_optional(true);
/// assert_eq!(req.targets, AuxTargets::All);
/// assert!(req.optional && !req.secure && req.ctx.is_none());
/// ```
#[derive(Debug, Message)]
#[rtype(result = "Result<AuxReplies, EngineError>")]
pub struct SendAuxRequest {
    /// Where to.
    pub targets: AuxTargets,
    /// The aux topic.
    pub topic: String,
    /// The request.
    pub request: Shareable,
    /// How long to wait for replies; zero = fire-and-forget (see [`aux_timeout_secs`]).
    pub timeout: Duration,
    /// Failures are logged at debug level only.
    pub optional: bool,
    /// End-to-end encryption requested.
    pub secure: bool,
    /// The context whose public props go with the request (a new one of the run when `None`).
    pub ctx: Option<FlContext>,
}

impl SendAuxRequest {
    /// A request with `optional = false`, `secure = false` and no context.
    pub fn new(
        targets: impl Into<AuxTargets>,
        topic: impl Into<String>,
        request: Shareable,
        timeout: Duration,
    ) -> Self {
        SendAuxRequest {
            targets: targets.into(),
            topic: topic.into(),
            request,
            timeout,
            optional: false,
            secure: false,
            ctx: None,
        }
    }

    /// Sets `optional`.
    pub fn with_optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }

    /// Sets `secure`.
    pub fn with_secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }

    /// Sets the context.
    pub fn with_ctx(mut self, ctx: FlContext) -> Self {
        self.ctx = Some(ctx);
        self
    }
}

impl Handler<SendAuxRequest> for AuxRunner {
    type Result = ResponseFuture<Result<AuxReplies, EngineError>>;

    fn handle(&mut self, msg: SendAuxRequest, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling(format_args!(
            "SendAuxRequest(topic {:?} to {:?}, timeout {:?})",
            msg.topic, msg.targets, msg.timeout
        ));
        let planned = if msg.topic.is_empty() {
            Err(EngineError::EmptyTopic)
        } else {
            targets::resolve(&msg.targets, self.directory.as_ref(), &self.site)
                .and_then(|t| self.plan(t))
        };
        let targets = match planned {
            Ok(t) => t,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let out = self.outbound(msg.topic, msg.timeout, msg.optional, msg.secure);
        Box::pin(out.send(Requests::Same(msg.request, targets), msg.ctx))
    }
}

/// Sends a different request to each target, with or without waiting for the
/// replies (unlike NVFlare, a non-zero timeout works, and message-root headers are copied).
///
/// Names follow the single-name rule (no `@ALL`, no empty-means-server); the first unknown name
/// fails with [`EngineError::UnknownTarget`] before anything is sent. An empty list replies an
/// empty map. Other errors as for [`SendAuxRequest`].
#[derive(Debug, Message)]
#[rtype(result = "Result<AuxReplies, EngineError>")]
pub struct MulticastAuxRequests {
    /// `(target name, its request)`, in order.
    pub requests: Vec<(String, Shareable)>,
    /// The aux topic.
    pub topic: String,
    /// How long to wait for replies; zero = fire-and-forget.
    pub timeout: Duration,
    /// Failures are logged at debug level only.
    pub optional: bool,
    /// End-to-end encryption requested.
    pub secure: bool,
    /// The context whose public props go with the requests (a new one of the run when `None`).
    pub ctx: Option<FlContext>,
}

impl MulticastAuxRequests {
    /// A multicast with `optional = false`, `secure = false` and no context.
    pub fn new(
        topic: impl Into<String>,
        requests: Vec<(String, Shareable)>,
        timeout: Duration,
    ) -> Self {
        MulticastAuxRequests {
            requests,
            topic: topic.into(),
            timeout,
            optional: false,
            secure: false,
            ctx: None,
        }
    }

    /// Sets `optional`.
    pub fn with_optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }

    /// Sets `secure`.
    pub fn with_secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }

    /// Sets the context.
    pub fn with_ctx(mut self, ctx: FlContext) -> Self {
        self.ctx = Some(ctx);
        self
    }
}

impl Handler<MulticastAuxRequests> for AuxRunner {
    type Result = ResponseFuture<Result<AuxReplies, EngineError>>;

    fn handle(&mut self, msg: MulticastAuxRequests, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling(format_args!(
            "MulticastAuxRequests(topic {:?} to {} target(s), timeout {:?})",
            msg.topic,
            msg.requests.len(),
            msg.timeout
        ));
        if msg.requests.is_empty() {
            return Box::pin(async { Ok(AuxReplies::new()) });
        }
        let planned: Result<Vec<(String, Fqcn, Shareable)>, EngineError> = if msg.topic.is_empty() {
            Err(EngineError::EmptyTopic)
        } else {
            msg.requests
                .into_iter()
                .map(|(name, request)| {
                    let target = targets::resolve_name(&name, self.directory.as_ref())
                        .ok_or(EngineError::UnknownTarget(name))?;
                    let fqcn = targets::target_fqcn(&target, &self.process_type, &self.job_id)?;
                    Ok((target.name, fqcn, request))
                })
                .collect()
        };
        let requests = match planned {
            Ok(r) => r,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let out = self.outbound(msg.topic, msg.timeout, msg.optional, msg.secure);
        Box::pin(out.send(Requests::Each(requests), msg.ctx))
    }
}

/// Sends one request to the server's job process without waiting for a reply (returns
/// nothing, where NVFlare returns an empty map; `secure` is kept, where NVFlare drops it).
///
/// Errors: [`EngineError::EmptyTopic`], [`EngineError::InvalidProcessType`],
/// [`EngineError::CellUnavailable`].
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct FireAndForgetAuxRequest {
    /// The aux topic.
    pub topic: String,
    /// The request.
    pub request: Shareable,
    /// Failures are logged at debug level only.
    pub optional: bool,
    /// End-to-end encryption requested.
    pub secure: bool,
    /// The context whose public props go with the request (a new one of the run when `None`).
    pub ctx: Option<FlContext>,
}

impl FireAndForgetAuxRequest {
    /// A message with `optional = false`, `secure = false` and no context.
    pub fn new(topic: impl Into<String>, request: Shareable) -> Self {
        FireAndForgetAuxRequest {
            topic: topic.into(),
            request,
            optional: false,
            secure: false,
            ctx: None,
        }
    }

    /// Sets `optional`.
    pub fn with_optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }

    /// Sets `secure`.
    pub fn with_secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }

    /// Sets the context.
    pub fn with_ctx(mut self, ctx: FlContext) -> Self {
        self.ctx = Some(ctx);
        self
    }
}

impl Handler<FireAndForgetAuxRequest> for AuxRunner {
    type Result = ResponseFuture<Result<(), EngineError>>;

    fn handle(&mut self, msg: FireAndForgetAuxRequest, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling(format_args!(
            "FireAndForgetAuxRequest(topic {:?})",
            msg.topic
        ));
        let planned = if msg.topic.is_empty() {
            Err(EngineError::EmptyTopic)
        } else {
            self.plan(vec![targets::server_target()])
        };
        let targets = match planned {
            Ok(t) => t,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let out = self.outbound(msg.topic, Duration::ZERO, msg.optional, msg.secure);
        Box::pin(async move {
            out.send(Requests::Same(msg.request, targets), msg.ctx)
                .await
                .map(|_| ())
        })
    }
}

/// Loads the job clients from the job meta: the given meta, or the `__job_meta__`
/// prop of a new context of the run. The clients and their hierarchy are built and checked
/// first; only then does the directory change, all at once, and the hierarchy
/// becomes the private sticker `__client_hierarchy__`. On error the previous directory stays.
///
/// Replies the clients, in job-meta order.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<Client>, EngineError>")]
pub struct GetJobClients {
    /// The job meta to read; `None` reads the run's `__job_meta__`.
    pub job_meta: Option<Value>,
}

impl Handler<GetJobClients> for AuxRunner {
    type Result = AtomicResponse<Self, Result<Vec<Client>, EngineError>>;

    fn handle(&mut self, msg: GetJobClients, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("GetJobClients");
        let run_info = self.run_info.clone();
        let load = async move {
            let mut ctx = run_info
                .send(crate::run_info::NewContext)
                .await
                .map_err(|_| EngineError::ActorGone { actor: "RunInfo" })?;
            let meta = msg
                .job_meta
                .or_else(|| ctx.get_prop(fl_ctx_key::JOB_META))
                .unwrap_or(Value::Nil);
            let (clients, hierarchy) = parse_job_clients(&meta)?;
            ctx.set_prop(
                fl_ctx_key::CLIENT_HIERARCHY,
                hierarchy.to_value(),
                true,
                true,
            )?;
            Ok(clients)
        };
        AtomicResponse::new(Box::pin(load.into_actor(self).map(
            |result: Result<Vec<Client>, EngineError>, act, _ctx| match result {
                Ok(clients) => {
                    log::info!(
                        "[job={} site={}] AuxRunner: {} job client(s) loaded",
                        act.job_id,
                        act.site,
                        clients.len()
                    );
                    act.directory = Some(Directory::new(clients.clone()));
                    Ok(clients)
                }
                Err(e) => {
                    log::error!(
                        "[job={} site={}] AuxRunner: job clients not loaded, directory kept: {e}",
                        act.job_id,
                        act.site
                    );
                    Err(e)
                }
            },
        )))
    }
}

/// Splits target names into valid and invalid ones, in order, duplicates kept, with
/// the same rule as sending (see [`AuxTargets`]): `server` / `server_parent` in any case and exact
/// job-client names are valid; `@ALL`, `""` and anything else are not.
///
/// Replies `(valid, invalid)`.
#[derive(Debug, Message)]
#[rtype(result = "(Vec<String>, Vec<String>)")]
pub struct ValidateTargets {
    /// The names to check.
    pub names: Vec<String>,
}

impl Handler<ValidateTargets> for AuxRunner {
    type Result = MessageResult<ValidateTargets>;

    fn handle(&mut self, msg: ValidateTargets, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("ValidateTargets");
        MessageResult(targets::validate(msg.names, self.directory.as_ref()))
    }
}

/// Looks up a job client by its exact name; `None` when unknown or not loaded yet.
#[derive(Debug, Message)]
#[rtype(result = "Option<Client>")]
pub struct GetClientFromName {
    /// The client's name.
    pub name: String,
}

impl Handler<GetClientFromName> for AuxRunner {
    type Result = MessageResult<GetClientFromName>;

    fn handle(&mut self, msg: GetClientFromName, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("GetClientFromName");
        MessageResult(
            self.directory
                .as_ref()
                .and_then(|d| d.client(&msg.name))
                .cloned(),
        )
    }
}

/// The job clients in job-meta order; `None` before [`GetJobClients`] succeeded.
#[derive(Debug, Message)]
#[rtype(result = "Option<Vec<Client>>")]
pub struct GetClients;

impl Handler<GetClients> for AuxRunner {
    type Result = MessageResult<GetClients>;

    fn handle(&mut self, _msg: GetClients, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("GetClients");
        MessageResult(self.directory.as_ref().map(|d| d.clients().to_vec()))
    }
}

/// The requests of one send, with their reply keys and cells.
enum Requests {
    /// One request for every target (unicast / broadcast).
    Same(Shareable, Vec<(String, Fqcn)>),
    /// A request per target (multicast).
    Each(Vec<(String, Fqcn, Shareable)>),
}

/// Everything an outgoing send needs, taken from the runner so the send runs outside it.
struct Outbound {
    env: DispatchEnv,
    cell: CellHandle,
    cell_wait_timeout: Duration,
    topic: String,
    timeout: Duration,
    optional: bool,
    secure: bool,
}

impl Outbound {
    fn prefix(&self) -> String {
        format!(
            "[job={} site={}] AuxRunner topic {}:",
            self.env.job_id, self.env.site, self.topic
        )
    }

    fn cell_error(&self, reason: String) -> EngineError {
        EngineError::CellUnavailable {
            fqcn: self.cell.fqcn().to_string(),
            reason,
        }
    }

    /// Prepares the requests with the context's public props and sends them.
    async fn send(
        self,
        requests: Requests,
        ctx: Option<FlContext>,
    ) -> Result<AuxReplies, EngineError> {
        let ctx = match ctx {
            Some(ctx) => ctx,
            None => self.env.new_context().await,
        };
        let messages: Vec<(String, Fqcn, CellMessage)> = match requests {
            Requests::Same(mut request, targets) => {
                send::prepare_request(&mut request, &self.topic, &ctx);
                // One message; per-target copies share the payload (an Arc).
                let message = send::cell_message(request);
                targets
                    .into_iter()
                    .map(|(name, fqcn)| (name, fqcn, message.clone()))
                    .collect()
            }
            Requests::Each(requests) => requests
                .into_iter()
                .map(|(name, fqcn, mut request)| {
                    send::prepare_request(&mut request, &self.topic, &ctx);
                    (name, fqcn, send::cell_message(request))
                })
                .collect(),
        };
        if self.timeout.is_zero() {
            self.fire_and_forget(messages).await?;
            Ok(AuxReplies::new())
        } else {
            self.request(messages).await
        }
    }

    async fn fire_and_forget(
        &self,
        messages: Vec<(String, Fqcn, CellMessage)>,
    ) -> Result<(), EngineError> {
        let sends = messages.into_iter().map(|(name, fqcn, message)| {
            let ff = FireAndForget::new(AUX_CHANNEL, self.topic.as_str(), vec![fqcn], message)
                .with_optional(self.optional)
                .with_secure(self.secure);
            async move {
                (
                    name,
                    tokio::time::timeout(self.cell_wait_timeout, self.cell.fire_and_forget(ff))
                        .await,
                )
            }
        });
        let prefix = self.prefix();
        for (name, result) in futures::future::join_all(sends).await {
            let codes = match result {
                Err(_) => {
                    return Err(self.cell_error(format!(
                        "fire-and-forget to {name} not accepted within {:?}",
                        self.cell_wait_timeout
                    )))
                }
                Ok(Err(e)) => return Err(self.cell_error(e.to_string())),
                Ok(Ok(codes)) => codes,
            };
            for (fqcn, code) in codes {
                if code != CellReturnCode::Ok {
                    let level = if self.optional {
                        log::Level::Debug
                    } else {
                        log::Level::Warn
                    };
                    log::log!(
                        level,
                        "{prefix} fire-and-forget to {name} ({fqcn}) failed: {code}"
                    );
                }
            }
        }
        Ok(())
    }

    async fn request(
        &self,
        messages: Vec<(String, Fqcn, CellMessage)>,
    ) -> Result<AuxReplies, EngineError> {
        // Later targets with the same cell overwrite earlier ones, as in NVFlare.
        let mut names: HashMap<Fqcn, String> = HashMap::with_capacity(messages.len());
        let mut requests = Vec::with_capacity(messages.len());
        for (name, fqcn, message) in messages {
            names.insert(fqcn.clone(), name);
            requests.push((fqcn, message));
        }
        let multi = SendMultiRequest::new(AUX_CHANNEL, self.topic.as_str(), requests, self.timeout)
            .with_optional(self.optional)
            .with_secure(self.secure)
            .with_abort(self.env.abort.clone());
        let replies = self
            .cell
            .send_multi_request(multi)
            .await
            .map_err(|e| self.cell_error(e.to_string()))?;
        let prefix = self.prefix();
        Ok(replies
            .into_iter()
            .filter_map(|(fqcn, reply)| {
                let name = names.get(&fqcn)?.clone();
                let shareable = send::convert_reply(reply, &name, &prefix, self.optional);
                Some((name, shareable))
            })
            .collect())
    }
}
