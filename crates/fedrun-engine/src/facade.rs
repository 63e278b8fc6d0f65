//! The `ClientRunManager` facade: one address for every engine call.
//!
//! NVFlare's components talk to one object, the engine. In fedrun the engine's state is split
//! over actors ([`RunInfo`], [`ComponentRegistry`], [`AuxRunner`], ...), and this actor gives
//! users NVFlare's single point of contact back: it accepts one message type per seed method of
//! NVFlare's `ClientRunManager` and forwards it, unchanged, to the actor that owns it. It holds no
//! state of its own beyond the owners' addresses, so it can never disagree with them.
//!
//! Forwarding keeps the message's reply type. If the owner is gone, the facade cannot make up a
//! reply of that type; it drops the reply channel instead, so the caller's `send` fails with
//! `MailboxError::Closed` (which [`EngineHandle`](crate::EngineHandle) turns into
//! [`EngineError::ActorGone`](crate::EngineError::ActorGone)), and logs the failure.
//!
//! Ordering: messages to the same owner keep the order in which the facade received them
//! (one mailbox each way); messages to different owners are independent.

use std::marker::PhantomData;

use actix::dev::{MessageResponse, OneshotSender, Request};
use actix::prelude::*;

use crate::aux::{
    AuxRunner, FireAndForgetAuxRequest, GetClientFromName, GetClients, GetJobClients,
    MulticastAuxRequests, RegisterAuxMessageHandler, SendAuxRequest, ValidateTargets,
};
use crate::registry::{
    AddComponent, AddHandler, AddWidget, BuildComponent, ComponentRegistry, FireEvent,
    GetAllComponents, GetComponent, GetWidget, PersistComponents, RegisterComponentFactory,
    SetBuildAuthorizer,
};
use crate::run_info::{
    AbortRun, GetAbortSignal, GetRunInfo, MarkRunStarted, NewContext, ReportError, ResetErrors,
    RunInfo, SetCurrentTask, ShowErrors,
};
use crate::stream::{RegisterStreamProcessing, StreamObjects, StreamProcessor};
use crate::task_fetcher::{
    GetFetcherState, GetTaskAssignment, OfferTaskResult, SendTaskResult, TaskFetcher,
};

/// Default mailbox capacity of the facade: calls from many components may arrive at once.
pub const FACADE_MAILBOX_CAPACITY: usize = 1024;

/// The addresses of the actors the facade forwards to.
#[derive(Clone)]
pub struct EngineActors {
    /// Run info, contexts, error log, abort signal.
    pub run_info: Addr<RunInfo>,
    /// Components, handlers, events, runtime builds.
    pub registry: Addr<ComponentRegistry>,
    /// Aux messages in and out, job clients.
    pub aux: Addr<AuxRunner>,
    /// Object streaming, both directions.
    pub stream: Addr<StreamProcessor>,
    /// Task pulls and result pushes.
    pub task: Addr<TaskFetcher>,
}

/// NVFlare's `ClientRunManager`, as a facade actor (see the module doc).
///
/// Usually started for you by [`ClientEngine`](crate::ClientEngine); users who prefer methods to
/// messages use the [`EngineHandle`](crate::EngineHandle) it returns.
///
/// # Example
/// ```
/// use fedrun_cell::Network;
/// use fedrun_engine::{ClientEngine, GetRunInfo};
///
/// actix::System::new().block_on(async {
///     let engine = ClientEngine::builder("site-1", "job-1").start(&Network::new()).await.unwrap();
///     // The raw address accepts the same messages as the owners do.
///     let info = engine.addr().send(GetRunInfo).await.unwrap();
///     assert_eq!(info.job_id, "job-1");
/// });
/// ```
pub struct ClientRunManager {
    actors: EngineActors,
    job_id: String,
    site: String,
}

impl ClientRunManager {
    /// A facade over `actors` (not started; call `.start()`).
    pub fn new(actors: EngineActors, site: &str, job_id: &str) -> Self {
        Self {
            actors,
            job_id: job_id.to_owned(),
            site: site.to_owned(),
        }
    }
}

impl Actor for ClientRunManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(FACADE_MAILBOX_CAPACITY);
        log::debug!(
            "[job={} site={}] ClientRunManager facade started",
            self.job_id,
            self.site
        );
    }
}

/// The reply of a forwarded message: the owner's reply, passed through.
///
/// If the owner's mailbox is closed the reply channel is dropped, so the caller sees a closed
/// mailbox rather than a made-up value.
///
/// `M` is the message the owner receives; `O` the one the facade received (the same type, except
/// for facade-only names such as [`AbortApp`]), with the same reply type.
pub struct Forwarded<A: Actor + Handler<M>, M: Message + Send + 'static, O = M>
where
    A::Context: actix::dev::ToEnvelope<A, M>,
    M::Result: Send,
{
    request: Request<A, M>,
    owner: &'static str,
    what: &'static str,
    received: PhantomData<fn() -> O>,
}

impl<A, M, O> MessageResponse<ClientRunManager, O> for Forwarded<A, M, O>
where
    A: Actor + Handler<M>,
    A::Context: actix::dev::ToEnvelope<A, M>,
    M: Message + Send + 'static,
    M::Result: Send,
    O: Message<Result = M::Result> + 'static,
{
    fn handle(self, ctx: &mut Context<ClientRunManager>, tx: Option<OneshotSender<M::Result>>) {
        let Forwarded {
            request,
            owner,
            what,
            received: _,
        } = self;
        // Tied to the facade's lifetime: if the facade stops, the reply channel is dropped.
        ctx.spawn(actix::fut::wrap_future::<_, ClientRunManager>(async move {
            match request.await {
                Ok(reply) => {
                    if let Some(tx) = tx {
                        // The caller may have stopped waiting: nothing to do then.
                        let _ = tx.send(reply);
                    }
                }
                Err(e) => {
                    log::error!(
                        "ClientRunManager could not forward {what} to {owner}: {e}; \
                         the caller sees a closed mailbox"
                    );
                    drop(tx);
                }
            }
        }));
    }
}

/// NVFlare's `abort_app(job_id)`, fixed: abort this engine's run when `job_id` is
/// its job (every actor and handler observing the run's abort signal sees it); otherwise log a
/// warning and do nothing. Replies whether the run was aborted.
///
/// # Example
/// ```
/// use fedrun_cell::Network;
/// use fedrun_engine::{AbortApp, ClientEngine};
///
/// actix::System::new().block_on(async {
///     let engine = ClientEngine::builder("site-1", "job-1").start(&Network::new()).await.unwrap();
///     let signal = engine.abort_signal().await.unwrap();
///     assert!(!engine.send(AbortApp { job_id: "other-job".into() }).await.unwrap());
///     assert!(!signal.is_triggered());
///     assert!(engine.send(AbortApp { job_id: "job-1".into() }).await.unwrap());
///     assert!(signal.is_triggered());
/// });
/// ```
#[derive(Debug, Clone, Message)]
#[rtype(result = "bool")]
pub struct AbortApp {
    /// The job to abort.
    pub job_id: String,
}

impl Handler<AbortApp> for ClientRunManager {
    type Result = Forwarded<RunInfo, AbortRun, AbortApp>;

    fn handle(&mut self, msg: AbortApp, _ctx: &mut Context<Self>) -> Self::Result {
        log::debug!(
            "[job={} site={}] ClientRunManager handles AbortApp(job_id={})",
            self.job_id,
            self.site,
            msg.job_id
        );
        Forwarded {
            request: self.actors.run_info.send(AbortRun {
                job_id: msg.job_id,
                reason: "abort_app".to_owned(),
            }),
            owner: "RunInfo",
            what: "AbortApp",
            received: PhantomData,
        }
    }
}

/// Stops the facade. It holds the only addresses of the engine's actors, so each of them stops
/// as soon as its mailbox is empty; calls in flight complete first.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct StopEngine;

impl Handler<StopEngine> for ClientRunManager {
    type Result = ();

    fn handle(&mut self, _msg: StopEngine, ctx: &mut Context<Self>) {
        log::info!(
            "[job={} site={}] ClientRunManager stops the engine",
            self.job_id,
            self.site
        );
        ctx.stop();
    }
}

/// Forwards each listed message type to the named owner, unchanged.
macro_rules! forward {
    ($($msg:ident => $owner:ident : $actor:ty),* $(,)?) => {$(
        impl Handler<$msg> for ClientRunManager {
            type Result = Forwarded<$actor, $msg>;

            fn handle(&mut self, msg: $msg, _ctx: &mut Context<Self>) -> Self::Result {
                log::debug!(
                    "[job={} site={}] ClientRunManager forwards {} to {}",
                    self.job_id,
                    self.site,
                    stringify!($msg),
                    stringify!($actor)
                );
                Forwarded {
                    request: self.actors.$owner.send(msg),
                    owner: stringify!($actor),
                    what: stringify!($msg),
                    received: PhantomData,
                }
            }
        }
    )*};
}

forward! {
    GetRunInfo => run_info: RunInfo,
    NewContext => run_info: RunInfo,
    ShowErrors => run_info: RunInfo,
    ResetErrors => run_info: RunInfo,
    ReportError => run_info: RunInfo,
    SetCurrentTask => run_info: RunInfo,
    MarkRunStarted => run_info: RunInfo,
    GetAbortSignal => run_info: RunInfo,
    AbortRun => run_info: RunInfo,
    AddComponent => registry: ComponentRegistry,
    GetComponent => registry: ComponentRegistry,
    GetAllComponents => registry: ComponentRegistry,
    AddHandler => registry: ComponentRegistry,
    FireEvent => registry: ComponentRegistry,
    AddWidget => registry: ComponentRegistry,
    GetWidget => registry: ComponentRegistry,
    PersistComponents => registry: ComponentRegistry,
    RegisterComponentFactory => registry: ComponentRegistry,
    SetBuildAuthorizer => registry: ComponentRegistry,
    BuildComponent => registry: ComponentRegistry,
    RegisterAuxMessageHandler => aux: AuxRunner,
    SendAuxRequest => aux: AuxRunner,
    MulticastAuxRequests => aux: AuxRunner,
    FireAndForgetAuxRequest => aux: AuxRunner,
    GetJobClients => aux: AuxRunner,
    ValidateTargets => aux: AuxRunner,
    GetClientFromName => aux: AuxRunner,
    GetClients => aux: AuxRunner,
    RegisterStreamProcessing => stream: StreamProcessor,
    StreamObjects => stream: StreamProcessor,
    GetTaskAssignment => task: TaskFetcher,
    SendTaskResult => task: TaskFetcher,
    OfferTaskResult => task: TaskFetcher,
    GetFetcherState => task: TaskFetcher,
}
