//! The user side of object streaming: what a producer, a consumer and a consumer factory are,
//! and the two receiver callbacks.
//!
//! A stream moves one large object as a sequence of Shareables. The sending site supplies an
//! [`ObjectProducer`] that cuts the object into pieces and judges the receivers' replies; each
//! receiving site registers a [`ConsumerFactory`] that makes one [`ObjectConsumer`] per incoming
//! stream. The traits are async (their methods return [`BoxFuture`]s, so no macro crate is needed)
//! and object safe, so the streamer holds them as boxed trait objects.
//!
//! User code reports a failure with `Err(text)`, like every other user callback of the engine;
//! a panic is caught by the streamer and treated as an error with the panic message.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fedrun_core::{FlContext, ReturnCode, Shareable, StreamContext, Value};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

/// One piece of a stream, as a producer hands it over: the request to send to every target and
/// how long to wait for their replies.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use fedrun_core::Shareable;
/// use fedrun_engine::stream::Produced;
///
/// let piece = Produced::new(Shareable::new(), Duration::from_secs(10));
/// assert_eq!(piece.timeout, Duration::from_secs(10));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Produced {
    /// The request (the streamer adds its `ObjectStreamer.*` headers).
    pub request: Shareable,
    /// How long to wait for the replies of this piece; must be positive (any positive duration
    /// is accepted). A zero timeout fails the stream.
    pub timeout: Duration,
}

impl Produced {
    /// A piece with this request and reply timeout.
    pub fn new(request: Shareable, timeout: Duration) -> Self {
        Produced { request, timeout }
    }
}

/// What a producer decides after seeing the replies to one piece.
///
/// NVFlare's `process_replies` returns `None` to go on, a truthy value to end with `OK`, or a
/// falsy non-`None` value to end with `ERROR`; fedrun says which one explicitly.
///
/// # Example
/// ```
/// use fedrun_core::Value;
/// use fedrun_engine::stream::StreamStep;
///
/// let step = StreamStep::Done(Value::from("all sites have the model"));
/// assert!(matches!(step, StreamStep::Done(_)));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum StreamStep {
    /// Send the next piece.
    Continue,
    /// The stream is over and succeeded: the stream ends with `OK` (or `TASK_ABORTED` if the run
    /// was aborted meanwhile) and this value is the stream's result.
    Done(Value),
    /// The stream is over and failed: the stream ends with `ERROR` (or `TASK_ABORTED` if the run
    /// was aborted meanwhile) and this value is the stream's result.
    Failed(Value),
}

/// The sending side of a stream (NVFlare's `ObjectProducer`).
///
/// The streamer calls [`produce`](ObjectProducer::produce), sends the piece to every target,
/// waits for all replies (or the piece's timeout), and hands them to
/// [`process_replies`](ObjectProducer::process_replies); then again, one piece at a time, until
/// `produce` returns `Ok(None)` (end of object) or `process_replies` returns a final step.
///
/// # Example
/// ```
/// use std::collections::HashMap;
/// use std::time::Duration;
/// use fedrun_core::{FlContext, Shareable, StreamContext};
/// use fedrun_engine::stream::{ObjectProducer, Produced, StreamStep};
/// use futures::future::BoxFuture;
///
/// /// Sends the numbers 0..n, one per message.
/// struct Counter { next: u32, n: u32 }
///
/// impl ObjectProducer for Counter {
///     fn produce<'a>(
///         &'a mut self,
///         _stream_ctx: &'a mut StreamContext,
///         _ctx: &'a FlContext,
///     ) -> BoxFuture<'a, Result<Option<Produced>, String>> {
///         Box::pin(async move {
///             if self.next == self.n {
///                 return Ok(None);
///             }
///             let mut piece = Shareable::new();
///             piece.insert("n", self.next);
///             self.next += 1;
///             Ok(Some(Produced::new(piece, Duration::from_secs(5))))
///         })
///     }
///
///     fn process_replies<'a>(
///         &'a mut self,
///         replies: &'a HashMap<String, Shareable>,
///         _stream_ctx: &'a mut StreamContext,
///         _ctx: &'a FlContext,
///     ) -> BoxFuture<'a, Result<StreamStep, String>> {
///         Box::pin(async move {
///             let failed: Vec<&String> =
///                 replies.iter().filter(|(_, r)| !r.return_code().is_ok()).map(|(s, _)| s).collect();
///             if failed.is_empty() {
///                 Ok(StreamStep::Continue)
///             } else {
///                 Ok(StreamStep::Failed(format!("failed at {failed:?}").into()))
///             }
///         })
///     }
/// }
/// ```
pub trait ObjectProducer: Send + 'static {
    /// The next piece, or `Ok(None)` when the object has been sent completely.
    ///
    /// `stream_ctx` is the stream's context: the caller's map plus `__channel__` and `__topic__`.
    /// Changes made before the first piece travel with it to the receivers (only the first
    /// message carries the context); later changes stay local and are returned to the caller.
    fn produce<'a>(
        &'a mut self,
        stream_ctx: &'a mut StreamContext,
        ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<Option<Produced>, String>>;

    /// Judges the replies to the last piece: one entry per target name (`"server"`, client
    /// names). A target that did not answer in time has a `TIMEOUT` reply, an unreachable one an
    /// `ERROR` reply; when a receiver ended the stream, its reply carries the stream-done
    /// callback's result in the header `ObjectStreamer.END_RESULT`.
    fn process_replies<'a>(
        &'a mut self,
        replies: &'a HashMap<String, Shareable>,
        stream_ctx: &'a mut StreamContext,
        ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<StreamStep, String>>;
}

/// What a consumer did with one piece.
///
/// # Example
/// ```
/// use fedrun_engine::stream::ConsumeResult;
///
/// let go_on = ConsumeResult::keep_going(None);
/// assert!(go_on.keep_going);
/// let done = ConsumeResult::stop(None);
/// assert!(!done.keep_going && done.reply.is_none());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ConsumeResult {
    /// `true` to receive more pieces; `false` ends the stream on this receiver (NVFlare's
    /// `continue`). The stream then ends with the reply's return code.
    pub keep_going: bool,
    /// The reply to the sender; `None` means a plain `OK` reply.
    pub reply: Option<Shareable>,
}

impl ConsumeResult {
    /// Go on receiving; answer with `reply` (`None`: `OK`).
    pub fn keep_going(reply: Option<Shareable>) -> Self {
        ConsumeResult {
            keep_going: true,
            reply,
        }
    }

    /// End the stream here; answer with `reply` (`None`: `OK`, so the stream ends with `OK`).
    pub fn stop(reply: Option<Shareable>) -> Self {
        ConsumeResult {
            keep_going: false,
            reply,
        }
    }
}

/// The receiving side of one stream (NVFlare's `ObjectConsumer`).
///
/// One consumer serves exactly one stream: it sees the stream's pieces in order, one at a time,
/// and [`finalize`](ObjectConsumer::finalize) is called exactly once when the stream ends on
/// this receiver, whatever the reason (normal end, error, abort, idle timeout). A `consume` that
/// is still running when the stream ends (the sender gave up, or the run was aborted) is
/// dropped at its current `.await`, then `finalize` runs.
///
/// # Example
/// ```
/// use fedrun_core::{FlContext, Shareable, StreamContext};
/// use fedrun_engine::stream::{ConsumeResult, ObjectConsumer};
/// use futures::future::BoxFuture;
///
/// /// Counts the pieces, and logs the total at the end.
/// struct Tally { pieces: u64 }
///
/// impl ObjectConsumer for Tally {
///     fn consume<'a>(
///         &'a mut self,
///         _request: Shareable,
///         _stream_ctx: &'a mut StreamContext,
///         _ctx: &'a FlContext,
///     ) -> BoxFuture<'a, Result<ConsumeResult, String>> {
///         self.pieces += 1;
///         Box::pin(async { Ok(ConsumeResult::keep_going(None)) })
///     }
///
///     fn finalize<'a>(
///         &'a mut self,
///         stream_ctx: &'a StreamContext,
///         _ctx: &'a FlContext,
///     ) -> BoxFuture<'a, Result<(), String>> {
///         println!("{} pieces, rc {:?}", self.pieces, stream_ctx.rc());
///         Box::pin(async { Ok(()) })
///     }
/// }
/// ```
pub trait ObjectConsumer: Send + 'static {
    /// Takes one piece. `stream_ctx` is the context the sender sent with the first piece, plus
    /// `__channel__` and `__topic__`; the consumer may keep its own entries in it.
    fn consume<'a>(
        &'a mut self,
        request: Shareable,
        stream_ctx: &'a mut StreamContext,
        ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<ConsumeResult, String>>;

    /// Called once when the stream ends on this receiver; `stream_ctx.rc()` (`__RC__`) says how
    /// it ended (`OK`, `TASK_ABORTED`, `TIMEOUT`, `BAD_REQUEST_DATA`, `EXECUTION_EXCEPTION`,
    /// ...). An error here is logged and the stream's rc becomes `EXECUTION_EXCEPTION`. The
    /// default does nothing.
    fn finalize<'a>(
        &'a mut self,
        _stream_ctx: &'a StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// Makes the consumer of each incoming stream (NVFlare's `ConsumerFactory`).
///
/// Registered with [`RegisterStreamProcessing`](crate::stream::RegisterStreamProcessing) for a
/// (channel, topic) pair; shared by all the streams of that pair, which may run concurrently.
///
/// # Example
/// ```
/// use fedrun_core::{FlContext, Shareable, StreamContext};
/// use fedrun_engine::stream::{ConsumeResult, ConsumerFactory, EndStream, ObjectConsumer};
/// use futures::future::BoxFuture;
///
/// struct Discard;
/// impl ObjectConsumer for Discard {
///     fn consume<'a>(
///         &'a mut self,
///         _request: Shareable,
///         _stream_ctx: &'a mut StreamContext,
///         _ctx: &'a FlContext,
///     ) -> BoxFuture<'a, Result<ConsumeResult, String>> {
///         Box::pin(async { Ok(ConsumeResult::keep_going(None)) })
///     }
/// }
///
/// struct DiscardFactory;
/// impl ConsumerFactory for DiscardFactory {
///     fn get_consumer<'a>(
///         &'a self,
///         _stream_ctx: &'a StreamContext,
///         _ctx: &'a FlContext,
///         _end: EndStream,
///     ) -> BoxFuture<'a, Result<Box<dyn ObjectConsumer>, String>> {
///         Box::pin(async { Ok(Box::new(Discard) as Box<dyn ObjectConsumer>) })
///     }
/// }
/// ```
pub trait ConsumerFactory: Send + Sync + 'static {
    /// The consumer of a new stream, called once per stream on its first message. An error
    /// refuses the stream (`EXECUTION_EXCEPTION` reply; nothing to finalise or return).
    ///
    /// `end` lets the consumer end its own stream later, from anywhere (NVFlare's
    /// `__end_stream__` hook), e.g. on its own timer.
    fn get_consumer<'a>(
        &'a self,
        stream_ctx: &'a StreamContext,
        ctx: &'a FlContext,
        end: EndStream,
    ) -> BoxFuture<'a, Result<Box<dyn ObjectConsumer>, String>>;

    /// Takes a consumer back after its stream ended and was finalised (called once per consumer
    /// that [`get_consumer`](ConsumerFactory::get_consumer) made). The default drops it.
    fn return_consumer<'a>(
        &'a self,
        consumer: Box<dyn ObjectConsumer>,
        _stream_ctx: &'a StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, ()> {
        drop(consumer);
        Box::pin(async {})
    }
}

/// A handle that ends one receiving stream (NVFlare's `stream_ctx["__end_stream__"]`).
///
/// Ending is asynchronous: the stream's session stops taking pieces and finalises with the given
/// return code. The first end wins; later calls (and calls after the stream ended) do nothing.
/// Calling it from inside `consume` is safe: the piece being consumed is answered first.
///
/// # Example
/// ```
/// use fedrun_core::AppReturnCode;
/// use fedrun_engine::stream::EndStream;
///
/// let (end, mut requests) = EndStream::channel();
/// assert!(end.end(AppReturnCode::Timeout));
/// assert!(!end.end(AppReturnCode::Ok)); // the first end wins
/// assert_eq!(requests.try_recv().unwrap().as_str(), "TIMEOUT");
/// ```
#[derive(Clone)]
pub struct EndStream {
    tx: mpsc::Sender<ReturnCode>,
}

impl EndStream {
    /// A handle and the receiving end its requests arrive on (the streamer makes one per
    /// stream; public so that consumers can be tested alone).
    pub fn channel() -> (EndStream, mpsc::Receiver<ReturnCode>) {
        let (tx, rx) = mpsc::channel(1);
        (EndStream { tx }, rx)
    }

    /// Asks for the stream to end with `rc`. Returns `false` when an end was already asked for
    /// or the stream is over.
    pub fn end(&self, rc: impl Into<ReturnCode>) -> bool {
        self.tx.try_send(rc.into()).is_ok()
    }
}

impl fmt::Debug for EndStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndStream")
            .field("open", &!self.tx.is_closed())
            .finish()
    }
}

/// Called once when a stream ended on the receiver, after the consumer was finalised (NVFlare's
/// `stream_done_cb`; extra keyword arguments are whatever the closure captures).
///
/// `stream_ctx.rc()` is the stream's final return code. `Ok(Some(value))` is the stream's end
/// result: when the stream ended because the consumer stopped it, it goes back to the sender in
/// the reply header `ObjectStreamer.END_RESULT`. An error is logged and counts as no result.
pub type StreamDoneCallback =
    Arc<dyn Fn(&StreamContext, &FlContext) -> Result<Option<Value>, String> + Send + Sync>;

/// Called after each successful `consume` (NVFlare's `consumed_cb`).
///
/// It receives the **whole** [`ConsumeResult`], i.e. the `(continue, reply)` pair that `consume`
/// returned, not only the reply: this is what NVFlare passes too, despite the name.
/// An error (or panic) ends the stream with `EXECUTION_EXCEPTION`, like a failing `consume`.
pub type ConsumedCallback =
    Arc<dyn Fn(&ConsumeResult, &StreamContext, &FlContext) -> Result<(), String> + Send + Sync>;

/// Wraps a closure as a [`StreamDoneCallback`].
///
/// # Example
/// ```
/// use fedrun_core::Value;
/// use fedrun_engine::stream::stream_done_cb;
///
/// let cb = stream_done_cb(|stream_ctx, _ctx| {
///     Ok(Some(Value::from(format!("done: {}", stream_ctx.rc().unwrap_or("?")))))
/// });
/// # let _ = cb;
/// ```
pub fn stream_done_cb<F>(f: F) -> StreamDoneCallback
where
    F: Fn(&StreamContext, &FlContext) -> Result<Option<Value>, String> + Send + Sync + 'static,
{
    Arc::new(f)
}

/// Wraps a closure as a [`ConsumedCallback`].
///
/// # Example
/// ```
/// use fedrun_engine::stream::consumed_cb;
///
/// let cb = consumed_cb(|result, _stream_ctx, _ctx| {
///     log::debug!("consumed a piece, keep going: {}", result.keep_going);
///     Ok(())
/// });
/// # let _ = cb;
/// ```
pub fn consumed_cb<F>(f: F) -> ConsumedCallback
where
    F: Fn(&ConsumeResult, &StreamContext, &FlContext) -> Result<(), String> + Send + Sync + 'static,
{
    Arc::new(f)
}
