//! Object streaming: the `StreamProcessor` actor (NVFlare's `ObjectStreamer`).
//!
//! Some objects are too large to send as one aux message (a model file, a log). A stream sends
//! such an object as a sequence of aux requests on the topic `ObjectStreamer.Request`, one piece
//! at a time, to one or more sites; each receiving site turns the pieces back into the object
//! with a consumer made for that stream. The messages carry NVFlare's headers
//! (`ObjectStreamer.TX_ID`, `.SEQ`, `.TOPIC`, `.CHANNEL`, `.CTX` on the first piece,
//! `.END_RESULT` on the reply that ends a stream), so a Python NVFlare site can be the other end.
//!
//! One [`StreamProcessor`] actor per engine plays both roles:
//!
//! - sender: [`StreamObjects`] streams one object with an [`ObjectProducer`] and replies with a
//!   [`StreamOutcome`];
//! - receiver: [`RegisterStreamProcessing`] registers a [`ConsumerFactory`] (and the optional
//!   `stream_done_cb` / `consumed_cb`) for a (channel, topic) pair; incoming streams are served
//!   by per-stream sessions, at most `max_concurrent_streaming_sessions` (20 by
//!   default) at a time.
//!
//! What fedrun does differently from NVFlare: no deadlock on a repeated first message
//! (#7); `consumed_cb` documented as receiving the whole `(continue, reply)` pair (#8); the end
//! notice carries the sender's real final rc, so a normal end is finalised as `OK`, not
//! `TASK_ABORTED` (#9); receivers are told on every sender exit, and an idle timeout ends
//! orphaned receiver sessions (#10); a piece's sequence number must be the previous one + 1
//! (#11); any positive timeout (#12); unknown targets fail before anything is sent (#13); the
//! caller's stream context is used and handed back in the outcome (#14); registrations are keyed
//! by the (channel, topic) pair (#15); `secure` is kept for the end notice (#16).
//!
//! The ready-made pair in [`bytes`] streams a file or an in-memory buffer in chunks; [`arrays`]
//! streams a model's arrays (ScatterAndGather's large-model path).
//! Why memory stays bounded, whatever the object's size, is written down in
//! `docs/streaming.md`.
//!
//! # Example
//!
//! Streaming a file from `site-1` to `site-2`, given each site's `StreamProcessor` address:
//!
//! ```no_run
//! use actix::Addr;
//! use fedrun_engine::stream::{
//!     BytesConsumerFactory, BytesProducer, ByteSink, RegisterStreamProcessing, StreamObjects,
//!     StreamProcessor,
//! };
//!
//! async fn share_model(site_1: Addr<StreamProcessor>, site_2: Addr<StreamProcessor>) {
//!     // site-2: write every stream of ("models", "global") to a file
//!     let (factory, mut received) =
//!         BytesConsumerFactory::new(|_stream_ctx| Ok(ByteSink::File("/tmp/global.bin".into())));
//!     site_2.send(RegisterStreamProcessing::new("models", "global", factory)).await.unwrap();
//!
//!     // site-1: send the file, 1 MiB at a time
//!     let producer = BytesProducer::from_file("/data/global.bin").unwrap();
//!     let outcome = site_1
//!         .send(StreamObjects::new("models", "global", "site-2", producer))
//!         .await
//!         .unwrap()
//!         .unwrap();
//!     assert!(outcome.rc.is_ok());
//!
//!     let file = received.recv().await.unwrap();
//!     println!("site-2 got {} bytes in {:?}", file.size, file.path);
//! }
//! ```

pub mod arrays;
pub mod bytes;
mod receiver;
mod sender;
pub mod traits;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use fedrun_cell::AbortSignal;
use fedrun_core::constants::{config_var, fl_ctx_key, stream as keys};
use fedrun_core::{AppReturnCode, FlContext, ReturnCode, Shareable, StreamContext, Value};
use tokio::sync::{mpsc, oneshot};

use crate::aux::{aux_handler, AuxRequest, AuxRunner, AuxTargets, RegisterAuxMessageHandler};
use crate::error::EngineError;
use crate::run_info::{GetAbortSignal, NewContext, RunInfo};

pub use self::arrays::{
    ArrayAssembler, ArrayPiece, ArraysProducer, ModelSlots, MODEL_CHANNEL, MODEL_CHUNK_SIZE,
    MODEL_STREAM_HEADER, TOPIC_RESULT, TOPIC_WEIGHTS,
};
pub use self::bytes::{
    ByteSink, BytesConsumer, BytesConsumerFactory, BytesProducer, ReceivedBytes,
    DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_TIMEOUT,
};
pub use self::receiver::WILDCARD;
pub use self::traits::{
    consumed_cb, stream_done_cb, ConsumeResult, ConsumedCallback, ConsumerFactory, EndStream,
    ObjectConsumer, ObjectProducer, Produced, StreamDoneCallback, StreamStep,
};

use self::receiver::{header_str, reply, Piece, Registration, Registry, Session};

/// Runs user code that returns a future; a panic while building the future or while polling it
/// becomes `Err(panic text)`.
pub(crate) async fn call_user<'a, T>(
    make: impl FnOnce() -> futures::future::BoxFuture<'a, T>,
) -> Result<T, String> {
    use futures::FutureExt;
    let fut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(make))
        .map_err(|panic| crate::component::panic_text(panic.as_ref()))?;
    std::panic::AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|panic| crate::component::panic_text(panic.as_ref()))
}

/// The default bound of concurrently open receiving streams
/// (`max_concurrent_streaming_sessions`).
pub const DEFAULT_MAX_SESSIONS: usize = config_var::MAX_CONCURRENT_STREAMING_SESSIONS_DEFAULT;

/// The default idle timeout of a receiving stream: no piece for this long ends it with
/// `TIMEOUT` (NVFlare's default communication timeout, 300 s).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The default mailbox capacity of the [`StreamProcessor`].
pub const DEFAULT_STREAM_MAILBOX: usize = 256;

/// What a [`StreamProcessor`] is built from.
///
/// # Example
/// ```no_run
/// use std::time::Duration;
/// use actix::Addr;
/// use fedrun_engine::{AuxRunner, RunInfo};
/// use fedrun_engine::stream::StreamConfig;
///
/// fn config(aux: Addr<AuxRunner>, run_info: Addr<RunInfo>) -> StreamConfig {
///     StreamConfig::new("site-1", "job-1", aux, run_info)
///         .with_max_sessions(5)
///         .with_idle_timeout(Duration::from_secs(60))
/// }
/// ```
#[derive(Clone)]
pub struct StreamConfig {
    /// This site's name (for logs).
    pub client_name: String,
    /// The job this engine runs (for logs).
    pub job_id: String,
    /// The aux runner the stream messages travel through.
    pub aux: Addr<AuxRunner>,
    /// The run: new contexts and the abort signal.
    pub run_info: Addr<RunInfo>,
    /// At most this many receiving streams are open at a time (NVFlare's
    /// `max_concurrent_streaming_sessions`, default 20); at least 1.
    pub max_sessions: usize,
    /// A receiving stream that gets no piece for this long is ended with `TIMEOUT`.
    pub idle_timeout: Duration,
    /// The actor's mailbox capacity.
    pub mailbox_capacity: usize,
}

impl StreamConfig {
    /// A config with the defaults ([`DEFAULT_MAX_SESSIONS`], [`DEFAULT_IDLE_TIMEOUT`],
    /// [`DEFAULT_STREAM_MAILBOX`]).
    pub fn new(
        client_name: impl Into<String>,
        job_id: impl Into<String>,
        aux: Addr<AuxRunner>,
        run_info: Addr<RunInfo>,
    ) -> Self {
        StreamConfig {
            client_name: client_name.into(),
            job_id: job_id.into(),
            aux,
            run_info,
            max_sessions: DEFAULT_MAX_SESSIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            mailbox_capacity: DEFAULT_STREAM_MAILBOX,
        }
    }

    /// Sets the bound of concurrently open receiving streams.
    pub fn with_max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = max;
        self
    }

    /// Sets the idle timeout of receiving streams.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets the mailbox capacity.
    pub fn with_mailbox_capacity(mut self, capacity: usize) -> Self {
        self.mailbox_capacity = capacity;
        self
    }
}

/// The table entry of one open receiving stream.
struct SessionEntry {
    generation: u64,
    last_seq: i64,
    pieces: mpsc::Sender<Piece>,
    end: EndStream,
}

/// The object streamer of one engine: sends streams ([`StreamObjects`]) and serves incoming ones
/// ([`RegisterStreamProcessing`]). See the [module doc](self).
///
/// Start it with [`StreamProcessor::start`], which also registers its two aux topics
/// (`ObjectStreamer.Request`, `ObjectStreamer.Abort`) with the engine's aux runner.
///
/// # Example
/// ```no_run
/// use actix::Addr;
/// use fedrun_engine::{AuxRunner, RunInfo};
/// use fedrun_engine::stream::{StreamConfig, StreamProcessor};
///
/// async fn streamer(aux: Addr<AuxRunner>, run_info: Addr<RunInfo>) -> Addr<StreamProcessor> {
///     StreamProcessor::start(StreamConfig::new("site-1", "job-1", aux, run_info))
///         .await
///         .expect("aux topics registered")
/// }
/// ```
pub struct StreamProcessor {
    site: String,
    job_id: String,
    log_prefix: String,
    aux: Addr<AuxRunner>,
    run_info: Addr<RunInfo>,
    abort: AbortSignal,
    registry: Registry,
    sessions: HashMap<String, SessionEntry>,
    next_generation: u64,
    max_sessions: usize,
    idle_timeout: Duration,
    mailbox_capacity: usize,
}

impl StreamProcessor {
    /// Starts the actor and registers its aux topics with `config.aux`.
    ///
    /// # Errors
    ///
    /// [`EngineError::ActorGone`] if the run-info or aux actor is gone; the aux runner's error
    /// (e.g. [`EngineError::DuplicateAuxHandler`]) if a topic is already taken.
    pub async fn start(config: StreamConfig) -> Result<Addr<StreamProcessor>, EngineError> {
        let abort = config
            .run_info
            .send(GetAbortSignal)
            .await
            .map_err(|_| EngineError::ActorGone { actor: "RunInfo" })?;
        let aux = config.aux.clone();
        let addr = StreamProcessor {
            log_prefix: format!("[job={} site={}]", config.job_id, config.client_name),
            site: config.client_name,
            job_id: config.job_id,
            aux: config.aux,
            run_info: config.run_info,
            abort,
            registry: Registry::default(),
            sessions: HashMap::new(),
            next_generation: 0,
            max_sessions: config.max_sessions.max(1),
            idle_timeout: config.idle_timeout,
            mailbox_capacity: config.mailbox_capacity.max(1),
        }
        .start();
        // The aux runner holds only a weak address: it must not keep the streamer alive.
        let weak = addr.downgrade();
        for topic in [keys::TOPIC_REQUEST, keys::TOPIC_ABORT] {
            let weak = weak.clone();
            let handler = aux_handler(move |req: AuxRequest| {
                let target = weak.upgrade();
                async move {
                    match target {
                        Some(streamer) => streamer.send(req).await.unwrap_or_else(|e| {
                            Err(format!("the stream processor is unavailable: {e}"))
                        }),
                        None => Err("the stream processor has stopped".to_owned()),
                    }
                }
            });
            aux.send(RegisterAuxMessageHandler {
                topic: topic.to_owned(),
                handler,
            })
            .await
            .map_err(|_| EngineError::ActorGone { actor: "AuxRunner" })??;
        }
        Ok(addr)
    }

    /// `what` is formatted only when debug logging is on: pass `format_args!(..)`, not `format!`,
    /// so the hot path allocates nothing for a line nobody reads.
    fn log_handling(&self, what: impl std::fmt::Display) {
        log::debug!(
            "[job={} site={}] StreamProcessor handles {what}",
            self.job_id,
            self.site
        );
    }

    /// Ends an open stream from the actor's side (no-op for an unknown stream): the entry is
    /// dropped and the session finalises with `rc` on its own.
    fn end_session(&mut self, tx_id: &str, rc: ReturnCode, why: &str) {
        if let Some(entry) = self.sessions.remove(tx_id) {
            log::info!(
                "{} stream {tx_id}: ending with {rc}: {why}",
                self.log_prefix
            );
            entry.end.end(rc);
        }
    }

    /// An `ObjectStreamer.Request`.
    fn on_piece(
        &mut self,
        req: AuxRequest,
        ctx: &mut Context<Self>,
    ) -> Result<oneshot::Receiver<Shareable>, Shareable> {
        let AuxRequest {
            request,
            ctx: fl_ctx,
            abort,
            ..
        } = req;
        let origin = request
            .peer_prop(fl_ctx_key::IDENTITY_NAME)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let prefix = self.log_prefix.clone();
        let bad = |text: String| {
            log::error!("{prefix} stream request from {origin} refused: {text}");
            reply(AppReturnCode::BadRequestData, Some(&text))
        };

        // 1. the stream's id
        let Some(tx_id) = header_str(&request, keys::HEADER_TX_ID).map(str::to_owned) else {
            return Err(bad(format!("missing {}", keys::HEADER_TX_ID)));
        };
        // 2. the other headers; a bad one ends the stream
        let channel = request
            .header_or_none(keys::HEADER_CHANNEL)
            .and_then(Value::as_str);
        let topic = request
            .header_or_none(keys::HEADER_TOPIC)
            .and_then(Value::as_str);
        let seq = request
            .header_or_none(keys::HEADER_SEQ)
            .and_then(Value::as_i64);
        let (channel, topic, seq) = match (channel, topic, seq) {
            (Some(c), Some(t), Some(s)) if !c.is_empty() && !t.is_empty() => {
                (c.to_owned(), t.to_owned(), s)
            }
            _ => {
                self.end_session(&tx_id, AppReturnCode::BadRequestData.into(), "bad headers");
                return Err(bad(format!(
                    "stream {tx_id}: missing or empty {}, {} or {}",
                    keys::HEADER_CHANNEL,
                    keys::HEADER_TOPIC,
                    keys::HEADER_SEQ
                )));
            }
        };
        log::debug!(
            "{prefix} stream {tx_id} seq {seq} from {origin} (channel {channel:?} topic {topic:?})"
        );
        // 3. abort
        if abort.is_triggered() || self.abort.is_triggered() {
            self.end_session(&tx_id, AppReturnCode::TaskAborted.into(), "run aborted");
            return Err(reply(AppReturnCode::TaskAborted, Some("run aborted")));
        }
        // 4. who consumes it
        let Some(registration) = self.registry.lookup(&channel, &topic).cloned() else {
            let text =
                format!("no consumer factory registered for channel {channel:?} topic {topic:?}");
            log::error!("{prefix} stream {tx_id} from {origin}: {text}");
            return Err(reply(AppReturnCode::ExecutionException, Some(&text)));
        };
        // 5. the sequence
        let (reply_tx, reply_rx) = oneshot::channel();
        let piece = Piece {
            request,
            seq,
            ctx: fl_ctx,
            reply: reply_tx,
        };
        if let Some(entry) = self.sessions.get_mut(&tx_id) {
            let expected = entry.last_seq + 1;
            if seq != expected {
                let text = if seq <= 0 {
                    format!("stream {tx_id}: sequence error: seq {seq} repeats the first message of an open stream (expected {expected})")
                } else {
                    format!("stream {tx_id}: sequence error: expected seq {expected}, got {seq}")
                };
                self.end_session(&tx_id, AppReturnCode::BadRequestData.into(), &text);
                return Err(bad(text));
            }
            return match entry.pieces.try_send(piece) {
                Ok(()) => {
                    entry.last_seq = seq;
                    Ok(reply_rx)
                }
                Err(mpsc::error::TrySendError::Full(_)) => Err(bad(format!(
                    "stream {tx_id}: seq {seq} arrived while seq {} is still queued; one piece at a time",
                    entry.last_seq
                ))),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.sessions.remove(&tx_id);
                    Err(bad(format!("stream {tx_id} has already ended")))
                }
            };
        }
        if seq != 0 {
            return Err(bad(format!(
                "stream {tx_id}: sequence error: expected 0 for a new stream, got {seq}"
            )));
        }
        let Some(stream_ctx) = piece
            .request
            .header_or_none(keys::HEADER_CTX)
            .and_then(Value::as_map)
            .filter(|m| !m.is_empty())
            .cloned()
        else {
            return Err(bad(format!(
                "stream {tx_id}: the first message has no {}",
                keys::HEADER_CTX
            )));
        };
        if self.sessions.len() >= self.max_sessions {
            let text = format!(
                "too many concurrent streaming sessions: {} of {} ({}) in use; try again later",
                self.sessions.len(),
                self.max_sessions,
                config_var::MAX_CONCURRENT_STREAMING_SESSIONS
            );
            log::warn!("{prefix} stream {tx_id} from {origin} refused: {text}");
            return Err(reply(AppReturnCode::ServiceUnavailable, Some(&text)));
        }
        let mut stream_ctx = StreamContext::from(stream_ctx);
        stream_ctx.set_channel_topic(&channel, &topic);
        let (pieces_tx, pieces_rx) = mpsc::channel(1);
        let (end, ends_rx) = EndStream::channel();
        let generation = self.next_generation;
        self.next_generation += 1;
        self.sessions.insert(
            tx_id.clone(),
            SessionEntry {
                generation,
                last_seq: 0,
                pieces: pieces_tx,
                end: end.clone(),
            },
        );
        let session = Session {
            tx_id,
            generation,
            log_prefix: prefix.clone(),
            origin,
            registration,
            stream_ctx,
            pieces: pieces_rx,
            ends: ends_rx,
            end_handle: end,
            abort: self.abort.clone(),
            idle_timeout: self.idle_timeout,
            processor: ctx.address().downgrade(),
        };
        actix::spawn(session.run(piece));
        Ok(reply_rx)
    }

    /// An `ObjectStreamer.Abort`, i.e. the sender's end notice: ends the
    /// stream with the notice's `__rc__` (`TASK_ABORTED` when absent), replies `OK`.
    fn on_end_notice(&mut self, req: &AuxRequest) -> Shareable {
        let Some(tx_id) = header_str(&req.request, keys::HEADER_TX_ID) else {
            let text = format!("end notice without {}", keys::HEADER_TX_ID);
            log::error!("{} {text}", self.log_prefix);
            return reply(AppReturnCode::BadRequestData, Some(&text));
        };
        let rc = match req
            .request
            .header_or_none(fedrun_core::constants::header_key::RC)
            .and_then(Value::as_str)
        {
            Some(rc) => ReturnCode::from(rc),
            None => AppReturnCode::TaskAborted.into(),
        };
        log::debug!(
            "{} stream {tx_id}: end notice with rc {rc}",
            self.log_prefix
        );
        let tx_id = tx_id.to_owned();
        self.end_session(&tx_id, rc, "the sender ended the stream");
        Shareable::make_reply(ReturnCode::OK, None)
    }
}

impl Actor for StreamProcessor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
        log::debug!("{} StreamProcessor started", self.log_prefix);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Dropping the table closes every session's piece channel: they finalise on their own.
        log::debug!(
            "{} StreamProcessor stopped with {} open stream(s)",
            self.log_prefix,
            self.sessions.len()
        );
    }
}

/// Registers the consumer factory (and callbacks) for the streams of one (channel, topic) pair
/// (NVFlare's `register_stream_processing`).
///
/// Either may be [`WILDCARD`] (`"*"`): an incoming stream uses the registration of (channel,
/// topic), else (channel, `*`), else (`*`, `*`). Registering a pair again replaces the earlier
/// registration (logged). Streams already open keep what they started with.
///
/// # Example
/// ```
/// use fedrun_core::Value;
/// use fedrun_engine::stream::{stream_done_cb, BytesConsumerFactory, RegisterStreamProcessing};
///
/// let (factory, _received) = BytesConsumerFactory::in_memory();
/// let msg = RegisterStreamProcessing::new("models", "*", factory)
///     .with_stream_done_cb(stream_done_cb(|_stream_ctx, _ctx| Ok(Some(Value::from("thanks")))));
/// assert_eq!(msg.topic, "*");
/// ```
#[derive(Message)]
#[rtype(result = "()")]
pub struct RegisterStreamProcessing {
    /// The application channel (`*`: any).
    pub channel: String,
    /// The application topic (`*`: any).
    pub topic: String,
    /// Makes one consumer per incoming stream.
    pub factory: Arc<dyn ConsumerFactory>,
    /// Called once per stream after the consumer was finalised; its result goes back to the
    /// sender when the consumer ended the stream.
    pub stream_done_cb: Option<StreamDoneCallback>,
    /// Called after each successful `consume` with the whole [`ConsumeResult`].
    pub consumed_cb: Option<ConsumedCallback>,
}

impl RegisterStreamProcessing {
    /// A registration of `factory` for (channel, topic), without callbacks.
    pub fn new(
        channel: impl Into<String>,
        topic: impl Into<String>,
        factory: impl ConsumerFactory,
    ) -> Self {
        Self::with_shared_factory(channel, topic, Arc::new(factory))
    }

    /// A registration of a factory that is shared with other registrations.
    pub fn with_shared_factory(
        channel: impl Into<String>,
        topic: impl Into<String>,
        factory: Arc<dyn ConsumerFactory>,
    ) -> Self {
        RegisterStreamProcessing {
            channel: channel.into(),
            topic: topic.into(),
            factory,
            stream_done_cb: None,
            consumed_cb: None,
        }
    }

    /// Sets the stream-done callback.
    pub fn with_stream_done_cb(mut self, cb: StreamDoneCallback) -> Self {
        self.stream_done_cb = Some(cb);
        self
    }

    /// Sets the consumed callback.
    pub fn with_consumed_cb(mut self, cb: ConsumedCallback) -> Self {
        self.consumed_cb = Some(cb);
        self
    }
}

impl Handler<RegisterStreamProcessing> for StreamProcessor {
    type Result = ();

    fn handle(&mut self, msg: RegisterStreamProcessing, _ctx: &mut Context<Self>) {
        self.log_handling("RegisterStreamProcessing");
        let RegisterStreamProcessing {
            channel,
            topic,
            factory,
            stream_done_cb,
            consumed_cb,
        } = msg;
        let replaced = self.registry.insert(
            channel.clone(),
            topic.clone(),
            Registration {
                factory,
                stream_done_cb,
                consumed_cb,
            },
        );
        if replaced {
            log::warn!(
                "{} stream processing for channel {channel:?} topic {topic:?} replaced",
                self.log_prefix
            );
        } else {
            log::info!(
                "{} stream processing registered for channel {channel:?} topic {topic:?}",
                self.log_prefix
            );
        }
    }
}

/// Streams one object to `targets` (NVFlare's `stream_objects`).
///
/// Replies when the stream is over: `Ok` with the final return code and the producer's result,
/// or `Err` when the targets are unknown ([`EngineError::UnknownTarget`],
/// [`EngineError::JobClientsNotLoaded`]; nothing was sent, the producer was not called), when
/// the producer failed or panicked ([`EngineError::StreamProducerFailed`]), or when the aux
/// runner failed. Receivers are told how the stream ended in every case once a piece was sent.
///
/// # Example
/// ```
/// use fedrun_core::{StreamContext, Value};
/// use fedrun_engine::AuxTargets;
/// use fedrun_engine::stream::{BytesProducer, StreamObjects};
///
/// let mut stream_ctx = StreamContext::new();
/// stream_ctx.set("name", "weights.bin");
/// let msg = StreamObjects::new("models", "global", AuxTargets::All, BytesProducer::from_bytes(vec![1u8; 10].into()))
///     .with_stream_ctx(stream_ctx)
///     .secure(true);
/// assert!(msg.secure && !msg.optional);
/// assert_eq!(msg.stream_ctx.get("name"), Some(&Value::from("weights.bin")));
/// ```
#[derive(Message)]
#[rtype(result = "Result<StreamOutcome, EngineError>")]
pub struct StreamObjects {
    /// The application channel.
    pub channel: String,
    /// The application topic.
    pub topic: String,
    /// The caller's stream context; `__channel__` and `__topic__` are added, the first piece
    /// carries it to the receivers, and the final one is in the [`StreamOutcome`].
    pub stream_ctx: StreamContext,
    /// Where the object goes.
    pub targets: AuxTargets,
    /// Cuts the object into pieces and judges the replies.
    pub producer: Box<dyn ObjectProducer>,
    /// The context to send with (its public props travel as peer props); `None`: a new context
    /// of the run.
    pub ctx: Option<FlContext>,
    /// Failures to reach a target are logged at debug level only.
    pub optional: bool,
    /// Ask the transport for end-to-end encryption (kept for every message).
    pub secure: bool,
}

impl StreamObjects {
    /// A stream of `producer`'s pieces on (channel, topic) to `targets`, with an empty stream
    /// context, a new run context, not optional, not secure.
    pub fn new(
        channel: impl Into<String>,
        topic: impl Into<String>,
        targets: impl Into<AuxTargets>,
        producer: impl ObjectProducer,
    ) -> Self {
        StreamObjects {
            channel: channel.into(),
            topic: topic.into(),
            stream_ctx: StreamContext::new(),
            targets: targets.into(),
            producer: Box::new(producer),
            ctx: None,
            optional: false,
            secure: false,
        }
    }

    /// Sets the stream context.
    pub fn with_stream_ctx(mut self, stream_ctx: StreamContext) -> Self {
        self.stream_ctx = stream_ctx;
        self
    }

    /// Sets the context to send with.
    pub fn with_ctx(mut self, ctx: FlContext) -> Self {
        self.ctx = Some(ctx);
        self
    }

    /// Sets `optional`.
    pub fn optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }

    /// Sets `secure`.
    pub fn secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }
}

/// How a stream ended, on the sender (NVFlare's `(rc, result)` pair, plus the stream's id, its
/// final context and the number of pieces sent).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamOutcome {
    /// The stream's transaction id (`ObjectStreamer.TX_ID`).
    pub tx_id: String,
    /// `OK` (the producer ran out of pieces, or judged the stream done), `ERROR` (the producer
    /// judged it failed) or `TASK_ABORTED` (the run was aborted).
    pub rc: ReturnCode,
    /// The producer's final value, when it ended the stream with a [`StreamStep`].
    pub result: Option<Value>,
    /// The stream context as it was at the end.
    pub stream_ctx: StreamContext,
    /// How many pieces were sent.
    pub pieces: u64,
}

impl Handler<StreamObjects> for StreamProcessor {
    type Result = ResponseFuture<Result<StreamOutcome, EngineError>>;

    fn handle(&mut self, mut msg: StreamObjects, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("StreamObjects");
        let run_info = self.run_info.clone();
        let aux = self.aux.clone();
        let abort = self.abort.clone();
        let log_prefix = self.log_prefix.clone();
        let ctx = msg.ctx.take();
        Box::pin(async move {
            let ctx = match ctx {
                Some(ctx) => ctx,
                None => run_info
                    .send(NewContext)
                    .await
                    .map_err(|_| EngineError::ActorGone { actor: "RunInfo" })?,
            };
            let env = sender::SenderEnv {
                log_prefix,
                aux,
                abort,
                ctx,
            };
            sender::run(env, msg).await
        })
    }
}

/// Incoming stream messages, as the aux runner hands them over: `ObjectStreamer.Request` (a
/// piece) and `ObjectStreamer.Abort` (the sender's end notice). Other topics are refused.
impl Handler<AuxRequest> for StreamProcessor {
    type Result = ResponseFuture<Result<Shareable, String>>;

    fn handle(&mut self, req: AuxRequest, ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling(format_args!("AuxRequest {}", req.topic));
        if req.topic == keys::TOPIC_ABORT {
            let answer = self.on_end_notice(&req);
            return Box::pin(async move { Ok(answer) });
        }
        if req.topic != keys::TOPIC_REQUEST {
            let text = format!("the stream processor does not handle topic {}", req.topic);
            return Box::pin(async move { Err(text) });
        }
        match self.on_piece(req, ctx) {
            Err(answer) => Box::pin(async move { Ok(answer) }),
            Ok(pending) => Box::pin(async move {
                Ok(pending.await.unwrap_or_else(|_| {
                    reply(
                        AppReturnCode::BadRequestData,
                        Some("the stream ended before this message was processed"),
                    )
                }))
            }),
        }
    }
}

/// Asks for the ids of the receiving streams open right now, sorted.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Vec<String>")]
pub struct GetOpenStreams;

impl Handler<GetOpenStreams> for StreamProcessor {
    type Result = MessageResult<GetOpenStreams>;

    fn handle(&mut self, _msg: GetOpenStreams, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("GetOpenStreams");
        let mut ids: Vec<String> = self.sessions.keys().cloned().collect();
        ids.sort();
        MessageResult(ids)
    }
}

/// A session tells the processor it ended (internal).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct SessionEnded {
    pub(crate) tx_id: String,
    pub(crate) generation: u64,
}

impl Handler<SessionEnded> for StreamProcessor {
    type Result = ();

    fn handle(&mut self, msg: SessionEnded, _ctx: &mut Context<Self>) {
        self.log_handling("SessionEnded");
        if self
            .sessions
            .get(&msg.tx_id)
            .is_some_and(|e| e.generation == msg.generation)
        {
            self.sessions.remove(&msg.tx_id);
        }
    }
}
