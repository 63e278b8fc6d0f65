//! Pushing a task result: NVFlare's `send_task_result`.
//!
//! Split from the pull side because the push has rules of its own: NVFlare's session check
//! (`__ssid__` of the result's context against the job's session id, refused without sending),
//! and success read from the cell code alone, which must be present (see the parent module doc).

use std::time::Duration;

use actix::{ActorFutureExt, Context, Handler, Message, ResponseActFuture, WrapFuture};
use fedrun_core::constants::fl_ctx_key;
use fedrun_core::{CellReturnCode, FlContext, Shareable};

use super::{context_or_new, set_current_task, TaskFetcher};
use crate::error::EngineError;

/// NVFlare's `send_task_result(result, fl_ctx, timeout)`: pushes a result.
///
/// The result gets the header `__task_name__` (`task_name`, else its own header, else the
/// context's `__task_name__` prop) and the context's public props as `__peer_ctx__`; it is sent
/// `optional` when its return code is `TASK_ABORTED`; its `__msg_root_id__` / `__msg_root_ttl__`
/// headers are copied to the cell headers. Replies `Ok(true)` only when the cell reply carries
/// `cn__return_code` `ok` (whatever its payload); any other code, or none, is logged as an error
/// and gives `Ok(false)`. A context whose `__ssid__` is not the engine's session id gives
/// `Ok(false)` without sending (NVFlare's `invalid_session`). The run's current task name is
/// cleared either way.
///
/// Errors: [`EngineError::ActorGone`] when `ctx` is `None` and `RunInfo` is gone;
/// [`EngineError::CellUnavailable`] when the job's own cell is stopped.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, EngineError>")]
pub struct SendTaskResult {
    /// The task result.
    pub result: Shareable,
    /// The task's name; `None`: the result's `__task_name__` header.
    pub task_name: Option<String>,
    /// The context whose public props go to the server, normally the pull's ([`TaskPull::ctx`](super::TaskPull::ctx));
    /// `None`: a new context of the run, in the current session.
    pub ctx: Option<FlContext>,
    /// The timeout; `None` (or zero): the communication timeout.
    pub timeout: Option<Duration>,
}

impl SendTaskResult {
    /// A push of `result` with no task name, context or timeout of its own.
    pub fn new(result: Shareable) -> Self {
        SendTaskResult {
            result,
            task_name: None,
            ctx: None,
            timeout: None,
        }
    }

    /// Sets the timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the task name (it wins over the result's `__task_name__` header).
    pub fn with_task_name(mut self, task_name: impl Into<String>) -> Self {
        self.task_name = Some(task_name.into());
        self
    }

    /// Sets the context whose public props go to the server.
    pub fn with_ctx(mut self, ctx: FlContext) -> Self {
        self.ctx = Some(ctx);
        self
    }
}

impl Handler<SendTaskResult> for TaskFetcher {
    type Result = ResponseActFuture<Self, Result<bool, EngineError>>;

    fn handle(&mut self, msg: SendTaskResult, _ctx: &mut Context<Self>) -> Self::Result {
        log::debug!("{} handles SendTaskResult", self.prefix());
        let SendTaskResult {
            result,
            task_name,
            ctx,
            timeout,
        } = msg;
        // an offer made by OfferTaskResult is released once a push is accepted
        let release = result
            .header_or_none(OFFERED_REFS_HEADER)
            .and_then(|v| fedrun_fobs::download_ref::refs_from_value(v).ok())
            .zip(self.downloads.clone());
        let run_info = self.run_info.clone();
        // A context made here belongs to the current session (see the module doc).
        let stamp = match (&ctx, &self.ssid) {
            (None, Some(ssid)) => Some(ssid.clone()),
            _ => None,
        };
        let push = async move {
            let mut ctx = context_or_new(ctx, run_info).await?;
            if let Some(ssid) = stamp {
                ctx.put(fl_ctx_key::SSID, ssid, true, false);
            }
            Ok::<_, EngineError>(ctx)
        }
        .into_actor(self)
        .then(move |ctx, act, _| {
            // NVFlare clears the pending task before its session check.
            let request = ctx.map(|ctx| {
                let matches = act.session_matches(&ctx);
                let request = act.push_request(result, task_name, &ctx, timeout);
                matches.then_some(request)
            });
            let cell = act.cell.clone();
            let cell_name = cell.fqcn().to_string();
            let run_info = act.run_info.clone();
            let prefix = act.prefix();
            async move {
                let Some(request) = request? else {
                    set_current_task(run_info, None, prefix.clone()).await;
                    log::error!(
                        "{prefix} failed to send task result: {} (not sent)",
                        CellReturnCode::InvalidSession
                    );
                    return Ok(false);
                };
                let reply = cell.send_request(request).await;
                set_current_task(run_info, None, prefix.clone()).await;
                let reply = reply.map_err(|e| EngineError::CellUnavailable {
                    fqcn: cell_name,
                    reason: e.to_string(),
                })?;
                match reply.headers.return_code() {
                    Some(code) if code.is_ok() => {
                        log::debug!("{prefix} task result sent");
                        if let Some((refs, downloads)) = release {
                            for r in refs {
                                downloads.release(&r.ref_id);
                            }
                        }
                        Ok(true)
                    }
                    Some(code) => {
                        log::error!(
                            "{prefix} failed to send task result: {code} ({})",
                            reply.headers.error().unwrap_or("no detail")
                        );
                        Ok(false)
                    }
                    None => {
                        log::error!(
                            "{prefix} failed to send task result: the reply has no \
                             cn__return_code, so the result was not accepted"
                        );
                        Ok(false)
                    }
                }
            }
            .into_actor(act)
        });
        Box::pin(push)
    }
}

/// The Shareable header under which [`OfferTaskResult`] leaves a result's download references
/// for its pushes. It never goes on the wire: the push moves it to the cell message.
pub const OFFERED_REFS_HEADER: &str = "__fedrun_offered_download_refs__";

/// Offers a task result's numpy arrays for download once, before it is pushed (when the engine
/// sends results as NVFlare download references; otherwise the result comes back unchanged).
///
/// The arrays move into the engine's download service and the result carries references in
/// their place, so a sender that keeps the result to retry a failed push keeps only the
/// references: the service holds the only handle on each array and serves it from its own
/// buffer, without a copy, however many times the push is tried. The arrays stay until a push
/// of the result is accepted, or until nobody downloaded them for the service's idle expiry.
#[derive(Debug, Message)]
#[rtype(result = "Shareable")]
pub struct OfferTaskResult {
    /// The task result.
    pub result: Shareable,
}

impl Handler<OfferTaskResult> for TaskFetcher {
    type Result = actix::MessageResult<OfferTaskResult>;

    fn handle(&mut self, msg: OfferTaskResult, _ctx: &mut Context<Self>) -> Self::Result {
        log::debug!("{} handles OfferTaskResult", self.prefix());
        let mut result = msg.result;
        // for any number of downloads (a push may be retried after the server pulled the
        // arrays): released when a push is accepted, else when idle for the expiry
        if let Some(refs) = self
            .downloads
            .as_ref()
            .and_then(|d| d.offer_to(&mut result, usize::MAX))
        {
            result.set_header(OFFERED_REFS_HEADER, refs);
        }
        actix::MessageResult(result)
    }
}
