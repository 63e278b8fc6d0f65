//! Sending NVFlare streams: big (or chosen) messages leave as `sm__DATA` chunks with windowed
//! acknowledgements.
//!
//! One DATA frame per message works up to the frame limit, but a Python cell sends anything on
//! its stream channels as a *stream*, and a large model update should not sit in one 2 GiB
//! frame: the receiver could not bound its memory and the sender could not be slowed down.
//! This module is the sending half of NVFlare's byte streamer:
//!
//! - **when** ([`StreamSendConfig`]): a request or fire-and-forget message whose encoded payload
//!   is above a threshold (one 1 MiB chunk plus 64 KiB of room for headers, by default), or any message on a channel chosen with
//!   [`StreamChannels`] (for instance NVFlare's own rule), leaves as a stream. Replies never do,
//!   except the reply to a streamed request, which always does (on `return_only`).
//! - **how**: the encoded blob is cut into `Bytes` slices (no copy), every non-final chunk
//!   exactly `chunk_size` bytes, the last one the remainder (an empty blob is one empty FINAL
//!   chunk); each chunk carries the `sm__*` headers NVFlare sets and the logical message's own
//!   headers, in the key order Python uses.
//! - **flow control**: before each chunk the sender pauses while `sent − acked > window`;
//!   `sm__ACK` messages advance `acked`. It then waits for the ACK of the final byte. No ACK
//!   progress for `ack_timeout` (60 s) ends the stream with [`WireError::StreamAckTimeout`] and
//!   a sender-side abort (`sm__DATA`, `sm__dt` 6) to the receiver; an `sm__ERROR` (or an error
//!   on `sm__ACK`) from the receiver ends it with [`WireError::StreamRejected`]. A cell sees
//!   either as a `comm_error` reply.
//! - **replies**: a streamed request carries a fresh `sm__ri`; the streamed reply that comes
//!   back on `return_only` with the same `sm__ri` is turned into an ordinary reply for the
//!   waiting request (its `cn__req_id`, channel and topic restored).
//!
//! Memory: the chunks are slices of the one encoded blob, and at most a window plus one chunk
//! of them is queued ahead of the receiver's ACKs.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedrun_cell::{header, CellMessage, Fqcn, Headers, MsgType, Payload, PayloadEncoding};
use fedrun_core::{CellReturnCode, Value};
use tokio::sync::{mpsc, oneshot, watch};

use crate::body::Body;
use crate::error::WireError;
use crate::frame::epoch_secs;
use crate::message::frame_from_message;
use crate::stream::{
    key, DataType, StreamMessage, RETURN_ONLY_CHANNEL, STREAM_CHANNEL, TOPIC_DATA,
};
use crate::stream_rx::{SEND_CHUNK_SIZE, SEND_WINDOW_SIZE};
use crate::transport::{Outbound, CELLNET_CHANNEL};

/// The ACK interval a sender announces in `sm__ai` (NVFlare's sender default, 16 MiB).
pub const SENDER_ACK_INTERVAL: u64 = 16 * 1024 * 1024;
/// How long a sender waits without ACK progress before it gives up (NVFlare's 60 s).
pub const STREAM_ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Room the stream threshold leaves above one chunk for the envelope of a message (its
/// Shareable headers and codec framing), 64 KiB.
pub const STREAM_THRESHOLD_HEADROOM: usize = 64 * 1024;
/// Encoded payloads above this size are streamed: one chunk (NVFlare's chunk size, 1 MiB) plus
/// [`STREAM_THRESHOLD_HEADROOM`], so that a message carrying one chunk's worth of data (an
/// object-stream piece of 1 MiB with its headers) still travels as one frame.
pub const STREAM_THRESHOLD: usize = SEND_CHUNK_SIZE + STREAM_THRESHOLD_HEADROOM;
/// The channels NVFlare's `Cell` never streams; every other non-empty channel
/// it streams.
pub const NVFLARE_UNSTREAMED_CHANNELS: [&str; 8] = [
    "admin",
    "task",
    "server_parent_listener",
    "client_command",
    "client_sub_worker_command",
    "multi_process_executor",
    "simulator_runner",
    RETURN_ONLY_CHANNEL,
];
/// Streamed requests whose reply may still come, at most.
const MAX_WAITING_REPLIES: usize = 4096;
/// How long a streamed request's reply bookkeeping is kept at most.
const WAITING_REPLY_TTL: Duration = Duration::from_secs(3600);

/// Which channels always stream, whatever the message size.
///
/// # Example
///
/// ```
/// use fedrun_wire::StreamChannels;
///
/// assert!(!StreamChannels::None.streams("aux_communication"));
/// assert!(StreamChannels::Nvflare.streams("aux_communication"));
/// assert!(!StreamChannels::Nvflare.streams("task"));
/// let only = StreamChannels::only(["server_command"]);
/// assert!(only.streams("server_command") && !only.streams("aux_communication"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StreamChannels {
    /// No channel: only the size threshold decides (the default; NVFlare accepts unstreamed
    /// requests on every channel).
    #[default]
    None,
    /// NVFlare's `Cell` rule: every non-empty channel except
    /// [`NVFLARE_UNSTREAMED_CHANNELS`].
    Nvflare,
    /// Exactly these channels.
    Only(BTreeSet<String>),
}

impl StreamChannels {
    /// [`StreamChannels::Only`] the given channels.
    pub fn only<I, S>(channels: I) -> StreamChannels
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        StreamChannels::Only(channels.into_iter().map(Into::into).collect())
    }

    /// Whether a message on `channel` is streamed whatever its size.
    pub fn streams(&self, channel: &str) -> bool {
        match self {
            StreamChannels::None => false,
            StreamChannels::Nvflare => {
                !channel.is_empty() && !NVFLARE_UNSTREAMED_CHANNELS.contains(&channel)
            }
            StreamChannels::Only(set) => set.contains(channel),
        }
    }
}

/// How this endpoint sends streams. The defaults are NVFlare's.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use fedrun_wire::{StreamChannels, StreamSendConfig, WireConfig};
///
/// let config = WireConfig {
///     stream_send: StreamSendConfig {
///         window_size: 4 * 1024 * 1024,
///         channels: StreamChannels::Nvflare,
///         ..StreamSendConfig::default()
///     },
///     ..WireConfig::default()
/// };
/// assert_eq!(config.stream_send.chunk_size, 1024 * 1024);
/// assert_eq!(config.stream_send.ack_timeout, Duration::from_secs(60));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSendConfig {
    /// Bytes per chunk (1 MiB); every chunk but the last has exactly this size. 0 counts as 1.
    pub chunk_size: usize,
    /// The sender pauses while more than this many sent bytes are unacknowledged (64 MiB).
    pub window_size: u64,
    /// The ACK interval announced in `sm__ai` (16 MiB; informational for the receiver).
    pub ack_interval: u64,
    /// A stream without ACK progress for this long is given up (60 s).
    pub ack_timeout: Duration,
    /// Requests and fire-and-forget messages whose encoded payload is larger than this are
    /// streamed ([`STREAM_THRESHOLD`], 1 MiB + 64 KiB); `usize::MAX` streams by channel only.
    pub threshold: usize,
    /// Channels whose messages are always streamed ([`StreamChannels::None`]).
    pub channels: StreamChannels,
}

impl Default for StreamSendConfig {
    fn default() -> Self {
        StreamSendConfig {
            chunk_size: SEND_CHUNK_SIZE,
            window_size: SEND_WINDOW_SIZE,
            ack_interval: SENDER_ACK_INTERVAL,
            ack_timeout: STREAM_ACK_TIMEOUT,
            threshold: STREAM_THRESHOLD,
            channels: StreamChannels::None,
        }
    }
}

impl StreamSendConfig {
    /// Whether a message with these headers and an encoded payload of `encoded_len` bytes
    /// leaves as a stream: only requests and fire-and-forget messages (`cn__msg_type` `req`)
    /// on a real channel (not the stream channel itself, `return_only` or CellNet's control
    /// channel), when the payload is above the threshold or the channel is chosen.
    ///
    /// # Example
    ///
    /// ```
    /// use fedrun_cell::{Headers, MsgType};
    /// use fedrun_wire::{StreamSendConfig, STREAM_THRESHOLD};
    ///
    /// let mut h = Headers::new();
    /// h.set_msg_type(MsgType::Req);
    /// h.set_channel("server_command");
    /// let config = StreamSendConfig::default();
    /// // one 1 MiB chunk plus its headers is still one frame
    /// assert!(!config.wants_stream(&h, 1024 * 1024 + 300));
    /// assert!(!config.wants_stream(&h, STREAM_THRESHOLD));
    /// assert!(config.wants_stream(&h, STREAM_THRESHOLD + 1));
    /// h.set_msg_type(MsgType::Reply);
    /// assert!(!config.wants_stream(&h, 1 << 30));
    /// ```
    pub fn wants_stream(&self, headers: &Headers, encoded_len: usize) -> bool {
        if headers.msg_type() != Some(MsgType::Req) {
            return false;
        }
        let channel = headers.channel().unwrap_or("");
        if channel.is_empty() || is_internal_channel(channel) {
            return false;
        }
        encoded_len > self.threshold || self.channels.streams(channel)
    }

    /// [`StreamSendConfig::wants_stream`] for a message whose payload carries download
    /// references (`has_refs`): such a request also leaves as a stream, whatever its size and
    /// the configured channels, when it is on a channel NVFlare's `Cell` streams
    /// ([`StreamChannels::Nvflare`]). An NVFlare 2.9 receiver pulls referenced arrays only while
    /// decoding a streamed message: its plain-message path decodes without the cell in the FOBS
    /// context, and fails with "FOBS Protocol Error" on a reference.
    ///
    /// # Example
    ///
    /// ```
    /// use fedrun_cell::{Headers, MsgType};
    /// use fedrun_wire::StreamSendConfig;
    ///
    /// let mut h = Headers::new();
    /// h.set_msg_type(MsgType::Req);
    /// h.set_channel("aux_communication");
    /// let config = StreamSendConfig::default();
    /// assert!(!config.wants_stream_with_refs(&h, 300, false));
    /// assert!(config.wants_stream_with_refs(&h, 300, true));
    /// h.set_channel("task"); // NVFlare never streams it
    /// assert!(!config.wants_stream_with_refs(&h, 300, true));
    /// ```
    pub fn wants_stream_with_refs(
        &self,
        headers: &Headers,
        encoded_len: usize,
        has_refs: bool,
    ) -> bool {
        if self.wants_stream(headers, encoded_len) {
            return true;
        }
        has_refs
            && headers.msg_type() == Some(MsgType::Req)
            && StreamChannels::Nvflare.streams(headers.channel().unwrap_or(""))
            && !is_internal_channel(headers.channel().unwrap_or(""))
    }

    /// The chunk size in force (at least 1).
    pub(crate) fn effective_chunk_size(&self) -> usize {
        self.chunk_size.max(1)
    }
}

/// The stream channel itself, `return_only` and CellNet's control channel: never streamed.
fn is_internal_channel(channel: &str) -> bool {
    channel == STREAM_CHANNEL || channel == RETURN_ONLY_CHANNEL || channel == CELLNET_CHANNEL
}

/// The per-stream numbers written into every chunk.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChunkParams {
    pub(crate) stream_id: u64,
    pub(crate) chunk_size: usize,
    pub(crate) window_size: u64,
}

/// The chunks of one logical message (a request or a fire-and-forget message), built lazily:
/// each chunk's payload is a slice of the blob.
pub(crate) struct MessageChunks {
    /// The encoded payload of the logical message.
    blob: Body,
    encoding: PayloadEncoding,
    request_id: Option<String>,
    channel: String,
    topic: String,
    origin: String,
    destination: String,
    optional: bool,
    secure: bool,
    /// Application headers and the few `cn__` headers a receiver needs from the logical
    /// message (`cn__msg_root_*`, `cn__pass_through`).
    carried: Vec<(String, Value)>,
    params: ChunkParams,
    ack_interval: u64,
    next_offset: usize,
    next_seq: u64,
    done: bool,
}

impl MessageChunks {
    /// The chunks of `logical` (headers as a cell stamped them; its encoded payload is
    /// `blob`). `request_id` is the `sm__ri` of a streamed request.
    ///
    /// # Errors
    ///
    /// [`WireError::StreamHeader`] when the message has no channel, topic, origin or
    /// destination.
    pub(crate) fn new(
        logical: &Headers,
        encoding: PayloadEncoding,
        blob: impl Into<Body>,
        request_id: Option<String>,
        params: ChunkParams,
        ack_interval: u64,
    ) -> Result<MessageChunks, WireError> {
        let need = |value: Option<&str>, key: &'static str| {
            value.map(str::to_owned).ok_or(WireError::StreamHeader {
                key,
                problem: "missing in the message to stream",
            })
        };
        const CARRIED_CN: [&str; 3] = [
            header::MSG_ROOT_ID,
            header::MSG_ROOT_TTL,
            header::PASS_THROUGH,
        ];
        let carried = logical
            .iter()
            .filter(|(k, _)| {
                CARRIED_CN.contains(k)
                    || !(k.starts_with(header::CELLNET_PREFIX)
                        || k.starts_with(header::STREAM_PREFIX))
            })
            .map(|(k, v)| (k.to_owned(), v.clone()))
            .collect();
        Ok(MessageChunks {
            blob: blob.into(),
            encoding,
            request_id,
            channel: need(logical.channel(), header::CHANNEL)?,
            topic: need(logical.topic(), header::TOPIC)?,
            origin: need(logical.origin(), header::ORIGIN)?,
            destination: need(logical.destination(), header::DESTINATION)?,
            optional: logical.optional().unwrap_or(false),
            secure: logical.secure().unwrap_or(false),
            carried,
            params,
            ack_interval,
            next_offset: 0,
            next_seq: 0,
            done: false,
        })
    }

    /// The headers of chunk `seq` at `offset`: Python's key order (loopback #13-#15), the
    /// logical message's application headers after the route.
    fn headers(&self, seq: u64, offset: usize, len: usize, is_final: bool) -> Headers {
        let now = epoch_secs();
        let mut h = Headers::new();
        h.insert(key::PAYLOAD_ENCODING, self.encoding.as_str());
        h.set_payload_len(len as u64);
        if let Some(ri) = &self.request_id {
            h.insert(key::REQUEST_ID, ri.as_str());
        }
        h.insert(key::CHANNEL, self.channel.as_str());
        h.insert(key::TOPIC, self.topic.as_str());
        h.insert(key::SIZE, self.blob.len());
        h.insert(key::ID, self.params.stream_id);
        let dt = if is_final {
            DataType::Final
        } else {
            DataType::Chunk
        };
        h.insert(key::DATA_TYPE, u64::from(dt.as_u8()));
        h.insert(key::SEQ, seq);
        h.insert(key::OFFSET, offset);
        h.insert(key::RELIABLE, false);
        h.insert(key::OPTIONAL, self.optional);
        h.insert(key::CHUNK_SIZE, self.params.chunk_size);
        h.insert(key::WINDOW_SIZE, self.params.window_size);
        if seq == 0 {
            h.insert(key::ACK_INTERVAL, self.ack_interval);
        }
        h.set_reply_expected(false);
        h.set_optional(self.optional);
        h.set_secure(self.secure);
        h.set_topic(TOPIC_DATA);
        h.set_channel(STREAM_CHANNEL);
        h.set_destination(self.destination.as_str());
        h.set_from(self.origin.as_str());
        h.set_to(self.destination.as_str());
        h.set_origin(self.origin.as_str());
        h.set_msg_type(MsgType::Req);
        h.set_route([(self.origin.as_str(), now)]);
        for (k, v) in &self.carried {
            h.insert(k.as_str(), v.clone());
        }
        h.set_payload_encoding(PayloadEncoding::Bytes);
        h.set_send_time(now);
        h
    }
}

impl Iterator for MessageChunks {
    type Item = CellMessage;

    fn next(&mut self) -> Option<CellMessage> {
        if self.done {
            return None;
        }
        let start = self.next_offset;
        let end = start
            .saturating_add(self.params.chunk_size)
            .min(self.blob.len());
        let is_final = end == self.blob.len();
        // zero-copy unless the chunk spans a segment boundary of the encoding
        let piece = self.blob.slice_bytes(start, end);
        let headers = self.headers(self.next_seq, start, piece.len(), is_final);
        self.next_offset = end;
        self.next_seq += 1;
        self.done = is_final;
        Some(CellMessage {
            headers,
            payload: Payload::Bytes(piece),
        })
    }
}

/// What a receiver said against a stream.
#[derive(Clone, Debug)]
struct Rejection {
    receiver: String,
    message: String,
    error_type: Option<String>,
}

/// Why a stream ended early, as seen by its ACK watcher.
#[derive(Clone, Debug)]
enum Failure {
    Rejected(Rejection),
    ConnectionLost,
}

/// The receiver's side of one outgoing stream, as its ACKs tell it.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// Bytes the receiver has consumed (`sm__os` of the best ACK).
    acked: u64,
    /// ACKs received.
    acks: u64,
    /// When `acked` last grew.
    advanced: Option<Instant>,
    failure: Option<Failure>,
}

struct Active {
    /// The receiving cell (ACKs and errors must come from it).
    target: String,
    /// The connection the stream leaves on.
    conn_id: u64,
    progress: watch::Sender<Progress>,
}

/// A streamed request whose streamed reply may come back.
#[derive(Debug)]
struct WaitingRequest {
    /// `cn__req_id` of the request, restored in the reply.
    req_id: Value,
    /// The local cell that sent the request.
    requester: Fqcn,
    /// The cell the request went to.
    responder: String,
    channel: String,
    topic: String,
    created: Instant,
}

/// One stream being sent: where, how big, and the limits.
pub(crate) struct Transmission<'a> {
    pub(crate) own: &'a Fqcn,
    pub(crate) peer: &'a Fqcn,
    /// The connection to `peer` the chunks are queued on.
    pub(crate) conn_id: u64,
    pub(crate) tx: &'a mpsc::Sender<Outbound>,
    /// The receiving cell.
    pub(crate) target: &'a Fqcn,
    pub(crate) stream_id: u64,
    pub(crate) size: u64,
    pub(crate) window: u64,
    pub(crate) ack_timeout: Duration,
    /// `channel/topic` of the logical message, for log lines.
    pub(crate) what: String,
    /// Seals each chunk for the target (a secure message), after its cleartext is counted.
    pub(crate) seal: Option<&'a crate::transport::secure::Sealer>,
}

/// Every stream this endpoint is sending, and the streamed requests waiting for a reply.
pub(crate) struct StreamSender {
    next_id: AtomicU64,
    active: Mutex<HashMap<u64, Active>>,
    waiting: Mutex<HashMap<String, WaitingRequest>>,
}

/// Removes a stream from the registry when its sender returns or is dropped; if it is dropped
/// while still armed (given up, or cancelled mid-way) it tells the receiver with a sender-side
/// abort.
struct Registration<'a> {
    sender: &'a StreamSender,
    stream_id: u64,
    tx: &'a mpsc::Sender<Outbound>,
    /// The headers of chunk 0, to address the abort; `None` until chunk 0 is built.
    first: Option<Headers>,
    sent: u64,
    armed: bool,
    reason: String,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.sender.lock_active().remove(&self.stream_id);
        if !self.armed {
            return;
        }
        let Some(first) = self.first.take() else {
            return;
        };
        let abort = abort_headers(first, self.stream_id, self.sent, &self.reason);
        match frame_from_message(CellMessage {
            headers: abort,
            payload: Payload::None,
        }) {
            // try_send: the abort is a courtesy; with a full queue the receiver's own
            // limits end the stream.
            Ok(frame) => {
                let _ = self.tx.try_send(Outbound {
                    frame,
                    body: None,
                    done: None,
                });
            }
            Err(e) => log::debug!("stream {} abort not built: {e}", self.stream_id),
        }
    }
}

/// The sender-side abort of a stream (`sm__DATA`, `sm__dt` 6), addressed like its chunk 0.
fn abort_headers(first: Headers, stream_id: u64, offset: u64, reason: &str) -> Headers {
    const KEPT_SM: [&str; 3] = [key::CHANNEL, key::TOPIC, key::REQUEST_ID];
    let mut h: Headers = first
        .into_iter()
        .filter(|(k, _)| !k.starts_with(header::STREAM_PREFIX) || KEPT_SM.contains(&k.as_str()))
        .collect();
    h.insert(key::ID, stream_id);
    h.insert(key::DATA_TYPE, u64::from(DataType::Error.as_u8()));
    h.insert(key::OFFSET, offset);
    h.insert(key::ERROR_MESSAGE, reason);
    h.set_optional(true);
    h.set_payload_encoding(PayloadEncoding::None);
    h.set_payload_len(0);
    h
}

impl StreamSender {
    pub(crate) fn new() -> StreamSender {
        // Sender-unique stream ids, like NVFlare's (epoch microseconds, then a counter).
        let seed = (epoch_secs() * 1e6) as u64;
        StreamSender {
            next_id: AtomicU64::new(seed),
            active: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh stream id.
    pub(crate) fn next_stream_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn lock_active(&self) -> MutexGuard<'_, HashMap<u64, Active>> {
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_waiting(&self) -> MutexGuard<'_, HashMap<String, WaitingRequest>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers the streamed request `logical` (from a local cell, `cn__req_id` set) under
    /// `request_id` (its `sm__ri`), so that its streamed reply finds it.
    pub(crate) fn expect_reply(&self, request_id: &str, logical: &Headers) {
        let (Some(req_id), Some(requester)) = (
            logical.get(header::REQ_ID).cloned(),
            logical.origin().and_then(|o| Fqcn::new(o).ok()),
        ) else {
            return;
        };
        let now = Instant::now();
        let mut waiting = self.lock_waiting();
        waiting.retain(|_, w| now.duration_since(w.created) < WAITING_REPLY_TTL);
        if waiting.len() >= MAX_WAITING_REPLIES {
            // the oldest is the least likely to be answered
            if let Some(oldest) = waiting
                .iter()
                .min_by_key(|(_, w)| w.created)
                .map(|(k, _)| k.clone())
            {
                log::warn!("streamed request {oldest} forgotten: too many waiting for replies");
                waiting.remove(&oldest);
            }
        }
        waiting.insert(
            request_id.to_owned(),
            WaitingRequest {
                req_id,
                requester,
                responder: logical.destination().unwrap_or("").to_owned(),
                channel: logical.channel().unwrap_or("").to_owned(),
                topic: logical.topic().unwrap_or("").to_owned(),
                created: now,
            },
        );
    }

    /// Forgets a streamed request whose stream failed.
    pub(crate) fn forget_reply(&self, request_id: &str) {
        self.lock_waiting().remove(request_id);
    }

    /// The reply to deliver for a streamed reply with `sm__ri` `request_id`: the local cell
    /// that asked, and the message with the request's `cn__req_id`, channel and topic restored
    /// and `cn__msg_type` `reply` (reply chunks say `req`). `None` for a reply nobody
    /// waits for (late, unknown, or from another cell than the one asked).
    pub(crate) fn take_reply(
        &self,
        own: &Fqcn,
        request_id: &str,
        mut reply: CellMessage,
    ) -> Option<(Fqcn, CellMessage)> {
        let origin = reply.headers.origin().unwrap_or("").to_owned();
        let mut waiting = self.lock_waiting();
        let Some(w) = waiting.get(request_id) else {
            drop(waiting);
            log::warn!(
                "endpoint {own}: streamed reply {request_id} from {origin:?} answers no waiting \
                 request (late or unknown), dropped"
            );
            return None;
        };
        if w.responder != origin {
            let expected = w.responder.clone();
            drop(waiting);
            log::warn!(
                "endpoint {own}: streamed reply {request_id} comes from {origin:?}, the request \
                 went to {expected:?}; dropped"
            );
            return None;
        }
        let w = waiting.remove(request_id)?;
        drop(waiting);
        let h = &mut reply.headers;
        h.set_msg_type(MsgType::Reply);
        h.insert(header::REQ_ID, w.req_id);
        h.set_channel(w.channel.as_str());
        h.set_topic(w.topic.as_str());
        h.set_destination(w.requester.as_str());
        h.remove(header::REPLY_EXPECTED);
        Some((w.requester, reply))
    }

    /// An `sm__ACK` or `sm__ERROR` message about a stream this endpoint sends.
    pub(crate) fn on_control(&self, own: &Fqcn, peer: &Fqcn, msg: &CellMessage) {
        let parsed = match StreamMessage::parse(&msg.headers) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("endpoint {own}: stream control message from {peer} dropped: {e}");
                return;
            }
        };
        let origin = msg.headers.origin().unwrap_or("");
        let str_of = |k: &str| {
            msg.headers
                .get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let (stream_id, update) = match parsed {
            StreamMessage::Ack(ack) => match str_of(key::ERROR_MESSAGE) {
                // an ACK carrying an error is a rejection (older receivers)
                Some(message) => (
                    ack.stream_id,
                    Err(Rejection {
                        receiver: origin.to_owned(),
                        message,
                        error_type: str_of(key::ERROR_TYPE),
                    }),
                ),
                None => (ack.stream_id, Ok(ack.offset)),
            },
            StreamMessage::Error(e) => (
                e.stream_id,
                Err(Rejection {
                    receiver: origin.to_owned(),
                    message: e
                        .message
                        .unwrap_or_else(|| "stream rejected by the receiver".to_owned()),
                    error_type: e.error_type,
                }),
            ),
            other => {
                log::debug!("endpoint {own}: stream message {other:?} from {peer} ignored");
                return;
            }
        };
        let active = self.lock_active();
        let Some(stream) = active.get(&stream_id) else {
            drop(active);
            // the last ACKs of a stream often come after its sender is done
            log::debug!(
                "endpoint {own}: {} for stream {stream_id} from {origin:?}: no such stream \
                 (late)",
                msg.headers.topic().unwrap_or("")
            );
            return;
        };
        if stream.target != origin {
            log::warn!(
                "endpoint {own}: {} for stream {stream_id} from {origin:?} ignored: the stream \
                 goes to {}",
                msg.headers.topic().unwrap_or(""),
                stream.target
            );
            return;
        }
        match update {
            Ok(offset) => stream.progress.send_modify(|p| {
                p.acks += 1;
                if offset > p.acked {
                    p.acked = offset;
                    p.advanced = Some(Instant::now());
                }
            }),
            Err(rejection) => stream.progress.send_modify(|p| {
                p.failure.get_or_insert(Failure::Rejected(rejection));
            }),
        }
    }

    /// Fails the streams leaving over the connection `conn_id` (it closed).
    pub(crate) fn forget_connection(&self, conn_id: u64) {
        for stream in self.lock_active().values().filter(|s| s.conn_id == conn_id) {
            stream.progress.send_modify(|p| {
                p.failure.get_or_insert(Failure::ConnectionLost);
            });
        }
    }

    /// Sends `chunks` (already addressed; `stamp` sets this hop's headers) over `t.tx` with
    /// flow control, then waits until the receiver has acknowledged the last byte.
    ///
    /// # Errors
    ///
    /// [`WireError::StreamAckTimeout`], [`WireError::StreamRejected`],
    /// [`WireError::StreamInterrupted`] (connection closed, chunk not written), or a frame
    /// encoding error.
    pub(crate) async fn transmit(
        &self,
        t: &Transmission<'_>,
        chunks: impl Iterator<Item = CellMessage>,
        stamp: impl Fn(&mut Headers),
    ) -> Result<(), WireError> {
        let (progress_tx, mut progress) = watch::channel(Progress::default());
        self.lock_active().insert(
            t.stream_id,
            Active {
                target: t.target.as_str().to_owned(),
                conn_id: t.conn_id,
                progress: progress_tx,
            },
        );
        let mut reg = Registration {
            sender: self,
            stream_id: t.stream_id,
            tx: t.tx,
            first: None,
            sent: 0,
            armed: true,
            reason: "sender cancelled".to_owned(),
        };
        log::debug!(
            "endpoint {}: stream {} of {} bytes ({}) to {} via {}",
            t.own,
            t.stream_id,
            t.size,
            t.what,
            t.target,
            t.peer
        );
        let result = self
            .send_all(t, &mut reg, &mut progress, chunks, stamp)
            .await;
        match &result {
            Ok(()) => reg.armed = false,
            Err(WireError::StreamRejected { .. } | WireError::StreamInterrupted { .. }) => {
                reg.armed = false;
            }
            Err(e) => reg.reason = e.to_string(),
        }
        if let Err(e) = &result {
            log::warn!(
                "endpoint {}: stream {} ({}) to {} failed after {} of {} bytes: {e}",
                t.own,
                t.stream_id,
                t.what,
                t.target,
                reg.sent,
                t.size
            );
        }
        result
    }

    async fn send_all(
        &self,
        t: &Transmission<'_>,
        reg: &mut Registration<'_>,
        progress: &mut watch::Receiver<Progress>,
        chunks: impl Iterator<Item = CellMessage>,
        stamp: impl Fn(&mut Headers),
    ) -> Result<(), WireError> {
        let started = Instant::now();
        let mut writes: VecDeque<oneshot::Receiver<Result<(), CellReturnCode>>> = VecDeque::new();
        for mut chunk in chunks {
            let sent = reg.sent;
            // NVFlare's strict comparison: a zero window still lets one chunk go
            wait_for(t, progress, started, |p| {
                sent.saturating_sub(p.acked) <= t.window
            })
            .await?;
            reap_writes(t, &mut writes)?;
            stamp(&mut chunk.headers);
            if reg.first.is_none() {
                reg.first = Some(chunk.headers.clone());
            }
            let len = chunk.payload.as_bytes().map_or(0, Bytes::len) as u64;
            if let Some(seal) = t.seal {
                seal.seal(&mut chunk)?;
            }
            let frame = frame_from_message(chunk)?;
            let (done, written) = oneshot::channel();
            t.tx.send(Outbound {
                frame,
                body: None,
                done: Some(done),
            })
            .await
            .map_err(|_| interrupted(t, "the connection closed"))?;
            writes.push_back(written);
            reg.sent += len;
        }
        for written in writes {
            match written.await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(interrupted(t, "a chunk could not be written")),
                Err(_) => return Err(interrupted(t, "the connection closed")),
            }
        }
        wait_for(t, progress, started, |p| p.acks > 0 && p.acked >= t.size).await
    }
}

fn interrupted(t: &Transmission<'_>, reason: &'static str) -> WireError {
    WireError::StreamInterrupted {
        stream_id: t.stream_id,
        reason,
    }
}

/// Fails on a chunk whose write already failed; drops the finished ones.
fn reap_writes(
    t: &Transmission<'_>,
    writes: &mut VecDeque<oneshot::Receiver<Result<(), CellReturnCode>>>,
) -> Result<(), WireError> {
    while let Some(front) = writes.front_mut() {
        match front.try_recv() {
            Ok(Ok(())) => {
                writes.pop_front();
            }
            Ok(Err(_)) => return Err(interrupted(t, "a chunk could not be written")),
            Err(oneshot::error::TryRecvError::Empty) => break,
            Err(oneshot::error::TryRecvError::Closed) => {
                return Err(interrupted(t, "the connection closed"))
            }
        }
    }
    Ok(())
}

/// Waits until `done(progress)`, failing on a rejection, a lost connection, or no ACK progress
/// for `t.ack_timeout` (counted from the last progress, or from `started`).
async fn wait_for(
    t: &Transmission<'_>,
    progress: &mut watch::Receiver<Progress>,
    started: Instant,
    done: impl Fn(&Progress) -> bool,
) -> Result<(), WireError> {
    let mut paused = false;
    loop {
        let deadline = {
            let p = progress.borrow_and_update();
            match &p.failure {
                Some(Failure::Rejected(r)) => {
                    return Err(WireError::StreamRejected {
                        stream_id: t.stream_id,
                        receiver: r.receiver.clone(),
                        message: r.message.clone(),
                        error_type: r.error_type.clone(),
                    })
                }
                Some(Failure::ConnectionLost) => {
                    return Err(interrupted(t, "the connection closed"))
                }
                None => {}
            }
            if done(&p) {
                return Ok(());
            }
            if !paused {
                paused = true;
                log::trace!(
                    "endpoint {}: stream {} waits for ACKs (acked {})",
                    t.own,
                    t.stream_id,
                    p.acked
                );
            }
            p.advanced.unwrap_or(started).max(started) + t.ack_timeout
        };
        match tokio::time::timeout_at(deadline.into(), progress.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(interrupted(t, "the stream was forgotten")),
            Err(_) => {
                let acked = progress.borrow().acked;
                return Err(WireError::StreamAckTimeout {
                    stream_id: t.stream_id,
                    waited: t.ack_timeout,
                    acked,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn logical() -> Headers {
        let mut h = Headers::new();
        h.set_msg_type(MsgType::Req);
        h.set_channel("server_command");
        h.set_topic("submit_update");
        h.set_origin("site-1");
        h.set_destination("server");
        h.set_req_id("req-1");
        h.set_reply_expected(true);
        h.set_optional(false);
        h.set_secure(false);
        h
    }

    fn params(chunk_size: usize) -> ChunkParams {
        ChunkParams {
            stream_id: 42,
            chunk_size,
            window_size: SEND_WINDOW_SIZE,
        }
    }

    fn parse(c: &CellMessage) -> crate::stream::Chunk {
        match StreamMessage::parse(&c.headers).unwrap() {
            StreamMessage::Chunk(chunk) => chunk,
            other => panic!("not a chunk: {other:?}"),
        }
    }

    #[test]
    fn chunks_are_full_slices_but_the_last_which_holds_the_remainder() {
        let blob = Bytes::from((0..5026u32).map(|i| i as u8).collect::<Vec<u8>>());
        let chunks: Vec<CellMessage> = MessageChunks::new(
            &logical(),
            PayloadEncoding::Fobs,
            blob.clone(),
            Some("ri".into()),
            params(2048),
            SENDER_ACK_INTERVAL,
        )
        .unwrap()
        .collect();
        assert_eq!(chunks.len(), 3);
        let mut joined = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let p = parse(c);
            let piece = c.payload.as_bytes().unwrap();
            assert_eq!((p.seq, p.offset), (i as u64, (i * 2048) as u64));
            assert_eq!(p.is_final, i == 2);
            assert_eq!(piece.len(), if i < 2 { 2048 } else { 930 });
            assert_eq!(p.size, 5026);
            assert_eq!(
                (p.channel.as_str(), p.topic.as_str()),
                ("server_command", "submit_update")
            );
            assert_eq!(p.request_id.as_deref(), Some("ri"));
            assert_eq!(p.payload_encoding, Some(PayloadEncoding::Fobs));
            assert_eq!(p.ack_interval.is_some(), i == 0);
            assert_eq!(
                (p.chunk_size, p.window_size),
                (Some(2048), Some(SEND_WINDOW_SIZE))
            );
            assert!(!p.reliable && !p.optional);
            assert!(
                c.headers.get(header::REQ_ID).is_none(),
                "Python's chunks carry no cn__req_id"
            );
            joined.extend_from_slice(piece);
        }
        assert_eq!(joined, blob.to_vec());
    }

    #[test]
    fn chunk_payloads_share_the_blob_instead_of_copying_it() {
        let blob = Bytes::from(vec![1u8; 10]);
        let base = blob.as_ptr() as usize;
        let chunks = MessageChunks::new(
            &logical(),
            PayloadEncoding::Bytes,
            blob,
            None,
            params(4),
            SENDER_ACK_INTERVAL,
        )
        .unwrap();
        for (i, c) in chunks.enumerate() {
            assert_eq!(
                c.payload.as_bytes().unwrap().as_ptr() as usize,
                base + 4 * i
            );
        }
    }

    #[test]
    fn blob_of_exactly_n_chunks_has_no_empty_tail_and_empty_blob_is_one_final() {
        let chunks: Vec<CellMessage> = MessageChunks::new(
            &logical(),
            PayloadEncoding::Bytes,
            Bytes::from(vec![0u8; 8]),
            None,
            params(4),
            SENDER_ACK_INTERVAL,
        )
        .unwrap()
        .collect();
        assert_eq!(chunks.len(), 2);
        assert!(parse(&chunks[1]).is_final);
        let empty: Vec<CellMessage> = MessageChunks::new(
            &logical(),
            PayloadEncoding::None,
            Bytes::new(),
            None,
            params(4),
            SENDER_ACK_INTERVAL,
        )
        .unwrap()
        .collect();
        assert_eq!(empty.len(), 1);
        let p = parse(&empty[0]);
        assert!(p.is_final && p.size == 0 && p.seq == 0);
    }

    #[test]
    fn chunk_key_order_is_pythons() {
        // loopback #13/#14 (Python's streamed submit_update) without its values
        let first = [
            "sm__pe",
            "cn__payload_len",
            "sm__ri",
            "sm__ch",
            "sm__tp",
            "sm__sz",
            "sm__id",
            "sm__dt",
            "sm__sq",
            "sm__os",
            "sm__rs",
            "sm__op",
            "sm__cs",
            "sm__ws",
            "sm__ai",
            "cn__reply_expected",
            "cn__optional",
            "cn__secure",
            "cn__topic",
            "cn__channel",
            "cn__destination",
            "cn__from",
            "cn__to",
            "cn__origin",
            "cn__msg_type",
            "cn__route",
            "cn__payload_encoding",
            "cn__send_time",
        ];
        let chunks: Vec<CellMessage> = MessageChunks::new(
            &logical(),
            PayloadEncoding::Fobs,
            Bytes::from(vec![0u8; 5]),
            Some("ri".into()),
            params(4),
            SENDER_ACK_INTERVAL,
        )
        .unwrap()
        .collect();
        let keys = |c: &CellMessage| {
            c.headers
                .iter()
                .map(|(k, _)| k.to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&chunks[0]), first);
        let second: Vec<&str> = first.iter().copied().filter(|k| *k != "sm__ai").collect();
        assert_eq!(keys(&chunks[1]), second);
    }

    #[test]
    fn application_headers_ride_along_and_missing_addresses_are_typed_errors() {
        let mut h = logical();
        h.insert("project_name", "p");
        h.insert(header::MSG_ROOT_ID, "root");
        let c = MessageChunks::new(
            &h,
            PayloadEncoding::Bytes,
            Bytes::new(),
            None,
            params(4),
            SENDER_ACK_INTERVAL,
        )
        .unwrap()
        .next()
        .unwrap();
        assert_eq!(
            c.headers.get("project_name").and_then(Value::as_str),
            Some("p")
        );
        assert_eq!(c.headers.msg_root_id(), Some("root"));
        let mut h = logical();
        h.remove(header::DESTINATION);
        assert!(matches!(
            MessageChunks::new(&h, PayloadEncoding::Bytes, Bytes::new(), None, params(4), 1),
            Err(WireError::StreamHeader {
                key: header::DESTINATION,
                ..
            })
        ));
    }

    #[test]
    fn only_requests_on_real_channels_above_the_threshold_or_chosen_are_streamed() {
        let config = StreamSendConfig {
            threshold: 10,
            channels: StreamChannels::only(["aux_communication"]),
            ..StreamSendConfig::default()
        };
        let mut h = logical();
        assert!(!config.wants_stream(&h, 10));
        assert!(config.wants_stream(&h, 11));
        h.set_channel("aux_communication");
        assert!(config.wants_stream(&h, 0));
        for internal in [STREAM_CHANNEL, RETURN_ONLY_CHANNEL, CELLNET_CHANNEL, ""] {
            h.set_channel(internal);
            assert!(!config.wants_stream(&h, 1000), "{internal:?}");
        }
        let mut reply = logical();
        reply.set_msg_type(MsgType::Reply);
        assert!(!config.wants_stream(&reply, 1000));
    }

    #[test]
    fn streamed_reply_is_given_back_the_requests_id_only_from_the_cell_asked() {
        let sender = StreamSender::new();
        let own = Fqcn::new("site-1").unwrap();
        sender.expect_reply("ri-1", &logical());
        let mut reply = CellMessage::new(Payload::Bytes(Bytes::from_static(b"x")));
        reply.headers.set_origin("elsewhere");
        reply.headers.set_req_id("");
        assert!(sender.take_reply(&own, "ri-1", reply.clone()).is_none());
        reply.headers.set_origin("server");
        reply.headers.set_msg_type(MsgType::Req);
        let (to, msg) = sender.take_reply(&own, "ri-1", reply.clone()).unwrap();
        assert_eq!(to.as_str(), "site-1");
        assert_eq!(msg.headers.req_id(), Some("req-1"));
        assert_eq!(msg.headers.msg_type(), Some(MsgType::Reply));
        assert_eq!(msg.headers.channel(), Some("server_command"));
        assert_eq!(msg.headers.topic(), Some("submit_update"));
        assert_eq!(msg.headers.destination(), Some("site-1"));
        assert!(
            sender.take_reply(&own, "ri-1", reply).is_none(),
            "answered once"
        );
    }

    #[test]
    fn sender_abort_keeps_the_address_and_says_why() {
        let chunk = MessageChunks::new(
            &logical(),
            PayloadEncoding::Bytes,
            Bytes::from_static(b"abc"),
            Some("ri".into()),
            params(4),
            SENDER_ACK_INTERVAL,
        )
        .unwrap()
        .next()
        .unwrap();
        let h = abort_headers(chunk.headers, 42, 3, "gave up");
        match StreamMessage::parse(&h).unwrap() {
            StreamMessage::Error(e) => {
                assert_eq!(e.stream_id, 42);
                assert_eq!(e.message.as_deref(), Some("gave up"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(h.topic(), Some(TOPIC_DATA));
        assert_eq!(h.destination(), Some("server"));
        assert_eq!(h.get(key::OFFSET).and_then(Value::as_u64), Some(3));
        assert!(h.get(key::SEQ).is_none());
    }
}
