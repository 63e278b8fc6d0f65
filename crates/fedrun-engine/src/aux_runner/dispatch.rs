//! Incoming aux messages: the user handler types and the checks every message goes through
//! before a handler sees it.
//!
//! Check order, each failure answered with a Shareable carrying the return code (inside a cell
//! `ok`, as NVFlare does):
//!
//! 1. the payload is not a Shareable → `BAD_REQUEST_DATA`;
//! 2. peer props present but not a map → `BAD_PEER_CONTEXT` (NVFlare crashes here);
//! 3. no handler for the topic → `TOPIC_UNKNOWN`;
//! 4. peer props missing or empty → `MISSING_PEER_CONTEXT`;
//! 5. only when enabled: the peer's `__run_num__` absent or not this job → `RUN_MISMATCH`;
//! 6. the handler fails or panics → `HANDLER_EXCEPTION` (the runner keeps serving);
//! 7. otherwise the handler's reply.
//!
//! The request's cookie jar, when non-empty, is copied onto the reply (error replies too), and the
//! reply gets this site's public props as its peer context unless the handler set one.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use actix::{Addr, Message, Recipient};
use fedrun_cell::{AbortSignal, Payload};
use fedrun_core::constants::fl_ctx_key;
use fedrun_core::{AppReturnCode, FlContext, PeerContext, Shareable, Value};
use futures::future::{BoxFuture, FutureExt};

use crate::component::panic_text;
use crate::run_info::{NewContext, ReportError, RunInfo};

/// The error-log group under which the aux runner reports (NVFlare's component name).
pub const AUX_ERROR_GROUP: &str = "AuxRunner";

/// The error-log key of the aux runner's reports.
pub const AUX_ERROR_KEY: &str = "error";

/// An incoming aux request, as a handler receives it.
///
/// Also the message an actor handles when it is registered as an aux handler
/// ([`AuxHandler::Actor`]); its reply is the handler's answer: `Ok(reply)`, or `Err(text)` which
/// the sender sees as `HANDLER_EXCEPTION`.
#[derive(Debug, Message)]
#[rtype(result = "Result<Shareable, String>")]
pub struct AuxRequest {
    /// The aux topic (the cell message's topic).
    pub topic: String,
    /// The request, as the peer sent it (headers `__topic__`, `__peer_props__`, cookies, ...).
    pub request: Shareable,
    /// A new context of this run, whose peer context holds the peer's public props.
    pub ctx: FlContext,
    /// Fires when the run is aborted (a child of the run's signal: triggering it does not abort
    /// the run).
    pub abort: AbortSignal,
}

/// An aux handler written as a function returning a future (see [`aux_handler`]).
pub type AuxHandlerFn =
    Arc<dyn Fn(AuxRequest) -> BoxFuture<'static, Result<Shareable, String>> + Send + Sync>;

/// What answers the aux requests of one topic: a function or an actor.
///
/// # Example
/// ```
/// use fedrun_core::Shareable;
/// use fedrun_engine::{aux_handler, AuxHandler, AuxRequest};
///
/// let echo: AuxHandler = aux_handler(|req: AuxRequest| async move { Ok(req.request) });
/// let failing: AuxHandler = aux_handler(|_req: AuxRequest| async move {
///     Err::<Shareable, _>("not today".to_owned())
/// });
/// # let _ = (echo, failing);
/// ```
#[derive(Clone)]
pub enum AuxHandler {
    /// A function returning a future; a panic while building or polling it is caught.
    Fn(AuxHandlerFn),
    /// An actor handling [`AuxRequest`]. A closed mailbox answers `HANDLER_EXCEPTION`. (A panic
    /// inside that actor is the actor's own business: it cannot be caught here.)
    Actor(Recipient<AuxRequest>),
}

impl fmt::Debug for AuxHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuxHandler::Fn(_) => f.write_str("AuxHandler::Fn"),
            AuxHandler::Actor(_) => f.write_str("AuxHandler::Actor"),
        }
    }
}

impl From<AuxHandlerFn> for AuxHandler {
    fn from(f: AuxHandlerFn) -> Self {
        AuxHandler::Fn(f)
    }
}

impl From<Recipient<AuxRequest>> for AuxHandler {
    fn from(r: Recipient<AuxRequest>) -> Self {
        AuxHandler::Actor(r)
    }
}

/// Wraps an async closure as an [`AuxHandler`].
pub fn aux_handler<F, Fut>(f: F) -> AuxHandler
where
    F: Fn(AuxRequest) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Shareable, String>> + Send + 'static,
{
    AuxHandler::Fn(Arc::new(move |req| f(req).boxed()))
}

/// Runs a handler; a failure, a panic or a closed actor mailbox is an `Err` text.
async fn run_handler(handler: AuxHandler, req: AuxRequest) -> Result<Shareable, String> {
    match handler {
        AuxHandler::Fn(f) => {
            let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| f(req))) {
                Ok(fut) => fut,
                Err(panic) => return Err(format!("handler {}", panic_text(panic.as_ref()))),
            };
            AssertUnwindSafe(fut)
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| Err(format!("handler {}", panic_text(panic.as_ref()))))
        }
        AuxHandler::Actor(recipient) => recipient
            .send(req)
            .await
            .unwrap_or_else(|e| Err(format!("handler actor unavailable: {e}"))),
    }
}

/// What the dispatch of one incoming message needs from the runner (captured synchronously, so
/// the dispatch itself runs outside the runner's mailbox).
pub(crate) struct DispatchEnv {
    pub(crate) job_id: String,
    pub(crate) site: String,
    pub(crate) run_info: Addr<RunInfo>,
    pub(crate) abort: AbortSignal,
    pub(crate) check_run_mismatch: bool,
}

impl DispatchEnv {
    /// A new context from the run; if the run-info actor is gone, a bare context with the job id
    /// and identity (so that replies still say who answered).
    pub(crate) async fn new_context(&self) -> FlContext {
        match self.run_info.send(NewContext).await {
            Ok(ctx) => ctx,
            Err(e) => {
                log::warn!(
                    "[job={} site={}] AuxRunner: no context from RunInfo ({e}); using a bare one",
                    self.job_id,
                    self.site
                );
                let mut ctx = FlContext::new();
                ctx.put(fl_ctx_key::RUN_NUM, self.job_id.as_str(), false, true);
                ctx.put(fl_ctx_key::IDENTITY_NAME, self.site.as_str(), false, false);
                ctx
            }
        }
    }

    /// Logs an error with job, site, topic and origin, and reports it to the run's error log.
    async fn report(&self, topic: &str, origin: &str, what: &str) {
        let message = format!("aux message topic {topic:?} from {origin:?}: {what}");
        log::error!(
            "[job={} site={}] AuxRunner: {message}",
            self.job_id,
            self.site
        );
        let report = ReportError {
            group: AUX_ERROR_GROUP.to_owned(),
            key: AUX_ERROR_KEY.to_owned(),
            message,
        };
        if let Err(e) = self.run_info.send(report).await {
            log::warn!(
                "[job={} site={}] AuxRunner: error not recorded, RunInfo unavailable: {e}",
                self.job_id,
                self.site
            );
        }
    }
}

/// One incoming message, its checks and its handler call; returns the reply Shareable.
pub(crate) async fn dispatch(
    env: DispatchEnv,
    handler: Option<AuxHandler>,
    topic: String,
    payload: Payload,
    origin: String,
) -> Shareable {
    let ctx = env.new_context().await;
    let own = ctx.to_peer_context();
    let Some(request) = payload.into_shareable() else {
        env.report(
            &topic,
            &origin,
            "request is not a Shareable (BAD_REQUEST_DATA)",
        )
        .await;
        return finish(
            Shareable::make_reply(AppReturnCode::BadRequestData, None),
            None,
            own,
        );
    };
    let jar = request.cookie_jar().filter(|j| !j.is_empty()).cloned();
    let reply = evaluate(&env, ctx, handler, &topic, request, &origin).await;
    finish(reply, jar, own)
}

/// Checks 2-7 of the module doc.
async fn evaluate(
    env: &DispatchEnv,
    mut ctx: FlContext,
    handler: Option<AuxHandler>,
    topic: &str,
    request: Shareable,
    origin: &str,
) -> Shareable {
    let error = |rc: AppReturnCode| Shareable::make_reply(rc, None);
    let props = match request.peer_props() {
        None | Some(Value::Nil) => None,
        Some(Value::Map(m)) => Some(m.clone()),
        Some(other) => {
            let what = format!(
                "peer props are a {}, not a map (BAD_PEER_CONTEXT)",
                other.kind()
            );
            env.report(topic, origin, &what).await;
            return error(AppReturnCode::BadPeerContext);
        }
    };
    let Some(handler) = handler else {
        env.report(
            topic,
            origin,
            "received unknown aux message topic (TOPIC_UNKNOWN)",
        )
        .await;
        return error(AppReturnCode::TopicUnknown);
    };
    let Some(props) = props.filter(|p| !p.is_empty()) else {
        env.report(
            topic,
            origin,
            "request has no peer props (MISSING_PEER_CONTEXT)",
        )
        .await;
        return error(AppReturnCode::MissingPeerContext);
    };
    if env.check_run_mismatch {
        let peer_run = props.get(fl_ctx_key::RUN_NUM).and_then(Value::as_str);
        if peer_run != Some(env.job_id.as_str()) {
            let what = format!(
                "peer job {:?} is not this job {} (RUN_MISMATCH)",
                peer_run, env.job_id
            );
            env.report(topic, origin, &what).await;
            return error(AppReturnCode::RunMismatch);
        }
    }
    let mut peer = FlContext::new();
    peer.set_public_props(&props);
    ctx.set_peer_context(peer.to_peer_context());
    let req = AuxRequest {
        topic: topic.to_owned(),
        request,
        ctx,
        abort: env.abort.child(),
    };
    match run_handler(handler, req).await {
        Ok(reply) => reply,
        Err(e) => {
            let what = format!("handler failed: {e} (HANDLER_EXCEPTION)");
            env.report(topic, origin, &what).await;
            error(AppReturnCode::HandlerException)
        }
    }
}

/// Copies the cookie jar and attaches this site's peer context unless the handler set one.
fn finish(mut reply: Shareable, jar: Option<fedrun_core::Map>, own: PeerContext) -> Shareable {
    if let Some(jar) = jar {
        reply.set_cookie_jar(jar);
    }
    if reply.peer_context().is_none() {
        reply.set_peer_context(own);
    }
    reply
}
