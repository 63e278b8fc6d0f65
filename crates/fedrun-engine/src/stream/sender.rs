//! The sending side of a stream.
//!
//! One stream is one async loop: produce a piece, send it to every target as an
//! `ObjectStreamer.Request` aux request, wait for all replies, let the producer judge them, and
//! again. Exactly one piece is outstanding at a time, which is what bounds the sender's memory.
//!
//! Differences from NVFlare, all deliberate:
//! - targets are checked before the producer is asked for anything;
//! - the end notice (topic `ObjectStreamer.Abort`, kept for wire compatibility) carries the
//!   stream's real final return code in `__rc__` — `OK` on a normal end, `TASK_ABORTED` on abort,
//!   the error otherwise — so that receivers finalise with it;
//! - the notice is sent on *every* exit once a piece went out, including producer errors and
//!   panics and the loop being dropped ([`EndNotice`]'s `Drop`), so receivers never keep an
//!   orphaned session because of the sender;
//! - the notice keeps the caller's `secure` flag;
//! - any positive timeout is accepted; a zero timeout is an error.

use actix::Addr;
use fedrun_cell::AbortSignal;
use fedrun_core::constants::stream as keys;
use fedrun_core::{AppReturnCode, FlContext, ReturnCode, Shareable, Value};
use std::collections::HashMap;

use crate::aux::{AuxRunner, AuxTargets, GetClients, SendAuxRequest, ValidateTargets};
use crate::error::EngineError;
use crate::stream::traits::{Produced, StreamStep};
use crate::stream::{call_user, StreamObjects, StreamOutcome};

/// What one outgoing stream needs besides the caller's message.
pub(crate) struct SenderEnv {
    pub(crate) log_prefix: String,
    pub(crate) aux: Addr<AuxRunner>,
    pub(crate) abort: AbortSignal,
    pub(crate) ctx: FlContext,
}

fn aux_gone(_: actix::MailboxError) -> EngineError {
    EngineError::ActorGone { actor: "AuxRunner" }
}

/// Fails when `targets` names a target the aux runner cannot resolve, before anything is sent
/// (NVFlare asks the producer first), with the aux runner's own error:
/// [`EngineError::UnknownTarget`] or [`EngineError::JobClientsNotLoaded`].
pub(crate) async fn check_targets(
    aux: &Addr<AuxRunner>,
    targets: &AuxTargets,
) -> Result<(), EngineError> {
    let names = match targets {
        AuxTargets::Server | AuxTargets::ServerParent => return Ok(()),
        AuxTargets::All => {
            return match aux.send(GetClients).await.map_err(aux_gone)? {
                Some(_) => Ok(()),
                None => Err(EngineError::JobClientsNotLoaded),
            };
        }
        AuxTargets::Site(name) => vec![name.clone()],
        AuxTargets::Sites(names) => names.clone(),
    };
    let (_valid, invalid) = aux
        .send(ValidateTargets { names })
        .await
        .map_err(aux_gone)?;
    match invalid.into_iter().next() {
        Some(name) => Err(EngineError::UnknownTarget(name)),
        None => Ok(()),
    }
}

/// The end notice of one stream: sent once, with the stream's final return code, as soon as a
/// first piece was sent. If the sending loop is dropped before it says how the stream ended (the
/// streamer stopped), `Drop` sends `TASK_ABORTED`.
pub(crate) struct EndNotice {
    aux: Addr<AuxRunner>,
    targets: AuxTargets,
    tx_id: String,
    secure: bool,
    ctx: FlContext,
    log_prefix: String,
    armed: bool,
}

impl EndNotice {
    fn message(tx_id: &str, rc: ReturnCode) -> Shareable {
        let mut notice = Shareable::make_reply(rc, None);
        notice.set_header(keys::HEADER_TX_ID, tx_id);
        notice
    }

    fn request(&self, rc: ReturnCode) -> SendAuxRequest {
        SendAuxRequest {
            targets: self.targets.clone(),
            topic: keys::TOPIC_ABORT.to_owned(),
            request: Self::message(&self.tx_id, rc),
            timeout: std::time::Duration::ZERO,
            optional: true,
            secure: self.secure,
            ctx: Some(self.ctx.clone()),
        }
    }

    /// From now on, every exit notifies the receivers.
    fn arm(&mut self) {
        self.armed = true;
    }

    /// Tells the receivers how the stream ended (nothing when no piece was sent).
    async fn send(&mut self, rc: ReturnCode) {
        if !self.armed {
            return;
        }
        self.armed = false;
        log::debug!(
            "{} stream {}: end notice with rc {rc}",
            self.log_prefix,
            self.tx_id
        );
        match self.aux.send(self.request(rc)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => log::warn!(
                "{} stream {}: end notice not sent: {e}; receivers end the stream on their idle \
                 timeout",
                self.log_prefix,
                self.tx_id
            ),
            Err(e) => log::warn!(
                "{} stream {}: end notice not sent, aux runner gone: {e}",
                self.log_prefix,
                self.tx_id
            ),
        }
    }
}

impl Drop for EndNotice {
    fn drop(&mut self) {
        if self.armed {
            log::warn!(
                "{} stream {}: sender stopped before the stream ended; telling receivers \
                 TASK_ABORTED",
                self.log_prefix,
                self.tx_id
            );
            // Loss is acceptable here: we cannot await in Drop, and a receiver that misses the
            // notice still ends the stream on its idle timeout.
            self.aux
                .do_send(self.request(AppReturnCode::TaskAborted.into()));
        }
    }
}

/// How one step of the loop went when it did not simply go on.
enum Exit {
    Finished(ReturnCode, Option<Value>),
    Failed(EngineError, ReturnCode),
}

/// Runs one stream to its end. `Ok` carries the final return code and result; `Err`
/// is a producer failure (error, panic, zero timeout) or an aux failure, after the receivers were
/// told.
pub(crate) async fn run(env: SenderEnv, msg: StreamObjects) -> Result<StreamOutcome, EngineError> {
    let SenderEnv {
        log_prefix,
        aux,
        abort,
        ctx,
    } = env;
    let StreamObjects {
        channel,
        topic,
        mut stream_ctx,
        targets,
        mut producer,
        optional,
        secure,
        ..
    } = msg;

    check_targets(&aux, &targets).await?;

    let tx_id = uuid::Uuid::new_v4().to_string();
    stream_ctx.set_channel_topic(&channel, &topic);
    log::info!(
        "{log_prefix} stream {tx_id} starts: channel {channel:?} topic {topic:?} to {targets:?}"
    );
    let mut notice = EndNotice {
        aux: aux.clone(),
        targets: targets.clone(),
        tx_id: tx_id.clone(),
        secure,
        ctx: ctx.clone(),
        log_prefix: log_prefix.clone(),
        armed: false,
    };
    let mut seq: i64 = 0;
    let producer_failed = |reason: String| {
        Exit::Failed(
            EngineError::StreamProducerFailed {
                tx_id: tx_id.clone(),
                reason,
            },
            AppReturnCode::ExecutionException.into(),
        )
    };

    let exit = loop {
        if abort.is_triggered() {
            break Exit::Finished(AppReturnCode::TaskAborted.into(), None);
        }

        // 1. the next piece (abort ends the wait)
        let produced = tokio::select! {
            biased;
            _ = abort.triggered() => None,
            r = call_user(|| producer.produce(&mut stream_ctx, &ctx)) => Some(r),
        };
        let produced = match produced {
            None => break Exit::Finished(AppReturnCode::TaskAborted.into(), None),
            Some(Ok(Ok(p))) => p,
            Some(Ok(Err(text))) => break producer_failed(format!("produce failed: {text}")),
            Some(Err(panic)) => break producer_failed(format!("produce {panic}")),
        };
        let Some(Produced {
            mut request,
            timeout,
        }) = produced
        else {
            break Exit::Finished(ReturnCode::OK, None);
        };
        if timeout.is_zero() {
            break producer_failed(
                "produce returned a zero timeout; the reply timeout must be positive".into(),
            );
        }

        // 2. send it to every target and wait for all replies
        request.set_header(keys::HEADER_CHANNEL, channel.as_str());
        request.set_header(keys::HEADER_TOPIC, topic.as_str());
        request.set_header(keys::HEADER_TX_ID, tx_id.as_str());
        request.set_header(keys::HEADER_SEQ, seq);
        if seq == 0 {
            request.set_header(keys::HEADER_CTX, stream_ctx.clone());
        }
        log::debug!("{log_prefix} stream {tx_id}: sending seq {seq} (timeout {timeout:?})");
        seq += 1;
        notice.arm();
        let send = aux.send(SendAuxRequest {
            targets: targets.clone(),
            topic: keys::TOPIC_REQUEST.to_owned(),
            request,
            timeout,
            optional,
            secure,
            ctx: Some(ctx.clone()),
        });
        let replies: HashMap<String, Shareable> = tokio::select! {
            biased;
            _ = abort.triggered() => break Exit::Finished(AppReturnCode::TaskAborted.into(), None),
            r = send => match r {
                Ok(Ok(replies)) => replies,
                Ok(Err(e)) => break Exit::Failed(e, AppReturnCode::ExecutionException.into()),
                Err(e) => break Exit::Failed(aux_gone(e), AppReturnCode::ExecutionException.into()),
            },
        };

        // 3. the producer judges the replies
        let step = call_user(|| producer.process_replies(&replies, &mut stream_ctx, &ctx)).await;
        let (rc, result) = match step {
            Ok(Ok(StreamStep::Continue)) => continue,
            Ok(Ok(StreamStep::Done(v))) => (ReturnCode::OK, v),
            Ok(Ok(StreamStep::Failed(v))) => (AppReturnCode::Error.into(), v),
            Ok(Err(text)) => break producer_failed(format!("process_replies failed: {text}")),
            Err(panic) => break producer_failed(format!("process_replies {panic}")),
        };
        let rc = if abort.is_triggered() {
            AppReturnCode::TaskAborted.into()
        } else {
            rc
        };
        break Exit::Finished(rc, Some(result));
    };

    match exit {
        Exit::Finished(rc, result) => {
            notice.send(rc.clone()).await;
            log::info!("{log_prefix} stream {tx_id} ended with {rc} after {seq} piece(s)");
            Ok(StreamOutcome {
                tx_id,
                rc,
                result,
                stream_ctx,
                pieces: seq.unsigned_abs(),
            })
        }
        Exit::Failed(error, rc) => {
            notice.send(rc.clone()).await;
            log::error!("{log_prefix} stream {tx_id} failed after {seq} piece(s): {error}");
            Err(error)
        }
    }
}
