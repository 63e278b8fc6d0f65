//! The receiving side of streams (NVFlare's `ObjectStreamer` receiver, with its
//! deadlock, leak and finalisation bugs fixed).
//!
//! The [`StreamProcessor`](crate::stream::StreamProcessor) actor keeps the table of open streams
//! and checks every incoming message (headers, abort, factory, sequence, session limit) without
//! ever awaiting user code. Each open stream is a *session*: a task of its own that owns the
//! stream's consumer and context, takes the stream's pieces one at a time from a one-slot
//! channel, and is the only place where the consumer is finalised. That gives, by construction:
//!
//! - `finalize`, `stream_done_cb` and `return_consumer` run exactly once per stream (the session
//!   ends once);
//! - streams never block each other or the actor (a slow or stuck consumer only holds its own
//!   session);
//! - ending a stream never needs a lock the caller already holds — NVFlare's deadlock there has no
//!   counterpart: the actor drops its table entry and tells the session, which finalises on its
//!   own.
//!
//! A session ends when its consumer says so (`keep_going == false`), when `consume`, the consumed
//! callback or the factory fail, on the sender's end notice (with the sender's rc), on a sequence
//! error, on abort (`TASK_ABORTED`), when the consumer calls its [`EndStream`] handle, when no
//! piece arrived for the idle timeout (`TIMEOUT`), or when the processor stops.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use actix::WeakAddr;
use fedrun_cell::AbortSignal;
use fedrun_core::constants::{header_key, stream as keys};
use fedrun_core::{AppReturnCode, FlContext, ReturnCode, Shareable, StreamContext, Value};
use tokio::sync::{mpsc, oneshot};

use crate::component::panic_text;
use crate::stream::traits::{
    ConsumedCallback, ConsumerFactory, EndStream, ObjectConsumer, StreamDoneCallback,
};
use crate::stream::{call_user, SessionEnded, StreamProcessor};

/// The channel/topic wildcard of factory registrations.
pub const WILDCARD: &str = "*";

/// What was registered for one (channel, topic) pair.
#[derive(Clone)]
pub(crate) struct Registration {
    pub(crate) factory: std::sync::Arc<dyn ConsumerFactory>,
    pub(crate) stream_done_cb: Option<StreamDoneCallback>,
    pub(crate) consumed_cb: Option<ConsumedCallback>,
}

/// Registrations keyed by the (channel, topic) pair itself, so `("a:b", "c")` and `("a", "b:c")`
/// are different keys.
#[derive(Default)]
pub(crate) struct Registry {
    entries: HashMap<(String, String), Registration>,
}

impl Registry {
    /// Stores `reg`; returns `true` when it replaced an earlier registration.
    pub(crate) fn insert(&mut self, channel: String, topic: String, reg: Registration) -> bool {
        self.entries.insert((channel, topic), reg).is_some()
    }

    /// (channel, topic), then (channel, `*`), then (`*`, `*`).
    pub(crate) fn lookup(&self, channel: &str, topic: &str) -> Option<&Registration> {
        let key = |c: &str, t: &str| (c.to_owned(), t.to_owned());
        self.entries
            .get(&key(channel, topic))
            .or_else(|| self.entries.get(&key(channel, WILDCARD)))
            .or_else(|| self.entries.get(&key(WILDCARD, WILDCARD)))
    }
}

/// A reply with `rc` and, when given, an `__error__` header explaining it.
pub(crate) fn reply(rc: impl Into<ReturnCode>, error: Option<&str>) -> Shareable {
    let mut r = Shareable::make_reply(rc, None);
    if let Some(text) = error {
        r.set_header(header_key::ERROR, text);
    }
    r
}

/// A non-empty string header.
pub(crate) fn header_str<'a>(request: &'a Shareable, key: &str) -> Option<&'a str> {
    request
        .header_or_none(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// One piece on its way to a session.
pub(crate) struct Piece {
    pub(crate) request: Shareable,
    pub(crate) seq: i64,
    pub(crate) ctx: FlContext,
    pub(crate) reply: oneshot::Sender<Shareable>,
}

/// Everything a session task owns.
pub(crate) struct Session {
    pub(crate) tx_id: String,
    pub(crate) generation: u64,
    pub(crate) log_prefix: String,
    pub(crate) origin: String,
    pub(crate) registration: Registration,
    pub(crate) stream_ctx: StreamContext,
    pub(crate) pieces: mpsc::Receiver<Piece>,
    pub(crate) ends: mpsc::Receiver<ReturnCode>,
    pub(crate) end_handle: EndStream,
    pub(crate) abort: AbortSignal,
    pub(crate) idle_timeout: Duration,
    pub(crate) processor: WeakAddr<StreamProcessor>,
}

/// Why the session stopped taking pieces.
enum Stop {
    /// The consumer (or a failure while consuming) ended it; the piece's reply is pending.
    Consumed(Shareable, oneshot::Sender<Shareable>),
    /// Ended from outside (notice, abort, idle timeout, `EndStream`, processor gone).
    Ended(ReturnCode, &'static str),
}

fn exec_exception(text: &str) -> Shareable {
    reply(AppReturnCode::ExecutionException, Some(text))
}

impl Session {
    /// Runs the session from its first piece to the end of the stream.
    pub(crate) async fn run(self, first: Piece) {
        let Session {
            tx_id,
            generation,
            log_prefix,
            origin,
            registration,
            mut stream_ctx,
            mut pieces,
            mut ends,
            end_handle,
            abort,
            idle_timeout,
            processor,
        } = self;
        let prefix = format!("{log_prefix} stream {tx_id} from {origin}:");
        let forget = || async {
            if let Some(addr) = processor.upgrade() {
                // The processor drops the entry only if it is still this session's.
                let _ = addr
                    .send(SessionEnded {
                        tx_id: tx_id.clone(),
                        generation,
                    })
                    .await;
            }
        };

        // The consumer, once per stream.
        let mut ctx = first.ctx.clone();
        let made = call_user(|| {
            registration
                .factory
                .get_consumer(&stream_ctx, &ctx, end_handle.clone())
        })
        .await;
        let mut consumer: Box<dyn ObjectConsumer> = match made {
            Ok(Ok(c)) => c,
            Ok(Err(text)) => {
                let text = format!("the consumer factory refused the stream: {text}");
                log::error!("{prefix} {text}");
                forget().await;
                let _ = first.reply.send(exec_exception(&text));
                return;
            }
            Err(panic) => {
                let text = format!("the consumer factory {panic}");
                log::error!("{prefix} {text}");
                forget().await;
                let _ = first.reply.send(exec_exception(&text));
                return;
            }
        };
        log::info!("{prefix} session opened");

        let mut next = Some(first);
        let stop = loop {
            // Wait for the next piece (or the end).
            let piece = match next.take() {
                Some(p) => p,
                None => tokio::select! {
                    biased;
                    rc = ends.recv() => {
                        break Stop::Ended(rc.unwrap_or(AppReturnCode::TaskAborted.into()), "ended");
                    }
                    _ = abort.triggered() => {
                        break Stop::Ended(AppReturnCode::TaskAborted.into(), "run aborted");
                    }
                    p = pieces.recv() => match p {
                        Some(p) => p,
                        None => break Stop::Ended(
                            AppReturnCode::TaskAborted.into(),
                            "stream processor stopped",
                        ),
                    },
                    _ = tokio::time::sleep(idle_timeout) => {
                        break Stop::Ended(AppReturnCode::Timeout.into(), "idle timeout");
                    }
                },
            };
            ctx = piece.ctx;
            let Piece {
                request,
                seq,
                reply: reply_tx,
                ..
            } = piece;
            log::debug!("{prefix} consuming seq {seq}");

            // Consume it; an end or an abort meanwhile drops the consume future.
            let consumed = tokio::select! {
                biased;
                r = call_user(|| consumer.consume(request, &mut stream_ctx, &ctx)) => r,
                rc = ends.recv() => {
                    let rc = rc.unwrap_or(AppReturnCode::TaskAborted.into());
                    let text = format!("stream ended ({rc}) while seq {seq} was being consumed");
                    let _ = reply_tx.send(reply(rc.clone(), Some(&text)));
                    break Stop::Ended(rc, "ended while consuming");
                }
                _ = abort.triggered() => {
                    let _ = reply_tx.send(reply(AppReturnCode::TaskAborted, Some("run aborted")));
                    break Stop::Ended(AppReturnCode::TaskAborted.into(), "run aborted while consuming");
                }
            };
            let (keep_going, mut answer) = match consumed {
                Ok(Ok(result)) => match registration.consumed_cb.as_ref() {
                    None => (result.keep_going, result.reply),
                    Some(cb) => {
                        match std::panic::catch_unwind(AssertUnwindSafe(|| {
                            cb(&result, &stream_ctx, &ctx)
                        })) {
                            Ok(Ok(())) => (result.keep_going, result.reply),
                            Ok(Err(text)) => {
                                let text = format!("consumed callback failed: {text}");
                                log::error!("{prefix} {text}");
                                (false, Some(exec_exception(&text)))
                            }
                            Err(panic) => {
                                let text =
                                    format!("consumed callback {}", panic_text(panic.as_ref()));
                                log::error!("{prefix} {text}");
                                (false, Some(exec_exception(&text)))
                            }
                        }
                    }
                },
                Ok(Err(text)) => {
                    let text = format!("consume failed at seq {seq}: {text}");
                    log::error!("{prefix} {text}");
                    (false, Some(exec_exception(&text)))
                }
                Err(panic) => {
                    let text = format!("consume at seq {seq} {panic}");
                    log::error!("{prefix} {text}");
                    (false, Some(exec_exception(&text)))
                }
            };
            let mut keep_going = keep_going;
            if abort.is_triggered() {
                keep_going = false;
                answer = Some(reply(AppReturnCode::TaskAborted, Some("run aborted")));
            }
            let answer = answer.unwrap_or_else(|| Shareable::make_reply(ReturnCode::OK, None));
            if !keep_going {
                break Stop::Consumed(answer, reply_tx);
            }
            // The sender may have given up waiting: nothing to do then.
            let _ = reply_tx.send(answer);
        };

        // The end of the stream, exactly once.
        forget().await;
        let (rc, why, pending) = match stop {
            Stop::Consumed(answer, reply_tx) => (
                answer.return_code(),
                "ended by the consumer",
                Some((answer, reply_tx)),
            ),
            Stop::Ended(rc, why) => (rc, why, None),
        };
        stream_ctx.set_rc(rc.as_str());
        let finalized = call_user(|| consumer.finalize(&stream_ctx, &ctx)).await;
        let failure = match finalized {
            Ok(Ok(())) => None,
            Ok(Err(text)) => Some(text),
            Err(panic) => Some(panic),
        };
        if let Some(text) = failure {
            log::error!("{prefix} finalize failed: {text}");
            stream_ctx.set_rc(AppReturnCode::ExecutionException.as_str());
        }
        let end_result = match registration.stream_done_cb.as_ref() {
            None => None,
            Some(cb) => {
                match std::panic::catch_unwind(AssertUnwindSafe(|| cb(&stream_ctx, &ctx))) {
                    Ok(Ok(v)) => v.filter(|v| !v.is_nil()),
                    Ok(Err(text)) => {
                        log::error!("{prefix} stream done callback failed: {text}");
                        None
                    }
                    Err(panic) => {
                        log::error!(
                            "{prefix} stream done callback {}",
                            panic_text(panic.as_ref())
                        );
                        None
                    }
                }
            }
        };
        let returned = call_user(|| {
            registration
                .factory
                .return_consumer(consumer, &stream_ctx, &ctx)
        })
        .await;
        if let Err(panic) = returned {
            log::error!("{prefix} return_consumer {panic}");
        }
        log::info!(
            "{prefix} session closed ({why}) with rc {}",
            stream_ctx.rc().unwrap_or("?")
        );
        if let Some((mut answer, reply_tx)) = pending {
            if let Some(v) = end_result {
                answer.set_header(keys::HEADER_END_RESULT, v);
            }
            let _ = reply_tx.send(answer);
        }
    }
}
