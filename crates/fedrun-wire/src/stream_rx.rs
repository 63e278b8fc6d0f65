//! Receiving NVFlare streams, and answering streamed requests with a streamed reply, as
//! NVFlare's cells do.
//!
//! Python sends every message on a stream channel (`aux_communication`, `server_command`,
//! `download_service__` ...) as chunks on `sm__STREAM`/`sm__DATA`. A fedrun cell must receive
//! them: [`StreamReceiver`] reassembles the chunks of each stream (keyed by origin and `sm__id`,
//! in order, tolerating a bounded number of out-of-order chunks and re-acknowledging
//! duplicates), acknowledges on `sm__ACK` when the un-acknowledged amount reaches 4 MiB and when
//! the final chunk has been consumed, decodes the blob per `sm__pe`, and turns it into an
//! ordinary cell message for the local cell. A streamed *request* (one with `sm__ri`) gets a
//! request id of the form `sm__ri:<sm__ri>`; when the cell's reply comes back through the
//! transport with that id, it is sent as a stream on channel `return_only`, topic
//! `"<channel>:<topic>"`, carrying the same `sm__ri` ([`StreamReceiver::reply_chunks`]), which
//! is what the Python requester waits for. A completed stream on `return_only` is the
//! streamed reply to one of this endpoint's own streamed requests: it is handed back
//! ([`StreamAction::Reply`]) to the sending side, which knows the waiting request.
//!
//! Every limit is enforced before data is kept: blob size (`sm__sz` and bytes actually
//! received), total bytes being reassembled, number of open streams, out-of-order chunks. A
//! violation ends that stream with an `sm__ERROR` message (also sent on `sm__ACK`, for older
//! senders) and keeps the connection open: the stream protocol has its own error path.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fedrun_cell::{header, CellMessage, Fqcn, Headers, MsgType, Payload, PayloadEncoding};
use fedrun_core::{CellReturnCode, Value};

use crate::frame::epoch_secs;
use crate::limits::Bounded;
use crate::message::{decode_payload_with_refs, encode_payload_body_with, ref_datums};
use crate::stream::{
    key, Chunk, DataType, StreamMessage, RETURN_ONLY_CHANNEL, STREAM_CHANNEL, TOPIC_ACK,
    TOPIC_DATA, TOPIC_ERROR,
};
use crate::stream_tx::ChunkParams;

/// Prefix of the request id given to a reassembled streamed request.
pub const STREAM_REQ_ID_PREFIX: &str = "sm__ri:";
/// The receiver's ACK interval (NVFlare's receiver default).
pub const RECEIVER_ACK_INTERVAL: u64 = 4 * 1024 * 1024;
/// Chunk size of the streams this endpoint sends (NVFlare's default).
pub const SEND_CHUNK_SIZE: usize = 1024 * 1024;
/// Window size announced on the streams this endpoint sends (NVFlare's default).
pub const SEND_WINDOW_SIZE: u64 = 64 * 1024 * 1024;
/// Chunks of one stream that may arrive ahead of a missing one.
const MAX_OUT_OF_ORDER: usize = 64;
/// Completed streams remembered to re-acknowledge duplicate chunks.
const DONE_MEMORY: usize = 256;
/// How long a streamed request waits for its cell's reply before its bookkeeping is dropped.
const PENDING_REPLY_TTL: Duration = Duration::from_secs(3600);
/// Most streamed requests awaiting a reply at once.
const MAX_PENDING_REPLIES: usize = 4096;

/// What the transport must do after a stream message.
#[derive(Debug)]
pub(crate) enum StreamAction {
    /// Send these headers (an ACK or an error, no payload) back on the connection.
    Control(Headers),
    /// Hand this complete message to the local cell it is addressed to.
    Deliver(CellMessage),
    /// A stream is complete: decode it ([`StreamReceiver::finish`], outside the receiver's
    /// lock and, when big, off the async executor), which gives the next actions.
    Decode(Box<Completed>),
    /// A streamed reply (on `return_only`) to the streamed request with this `sm__ri`; the
    /// sending side knows which request that was.
    Reply {
        /// `sm__ri` of the stream.
        request_id: String,
        /// The reply as it arrived (`sm__*` headers removed).
        reply: CellMessage,
    },
}

/// A streamed request waiting for its cell's reply.
#[derive(Debug, Clone)]
pub(crate) struct PendingReply {
    request_id: String,
    channel: String,
    topic: String,
    requester: String,
    created: Instant,
}

/// Limits of the receiver.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_blob: u64,
    pub(crate) max_buffered: u64,
    pub(crate) max_open: usize,
    /// A stream that received nothing for this long is dropped ([`StreamReceiver::expire_idle`]).
    pub(crate) idle_timeout: Duration,
    /// Blobs of at least this many bytes are decoded on tokio's blocking pool.
    pub(crate) blocking_decode_min: usize,
}

/// A complete stream taken out of the receiver, to be decoded by [`StreamReceiver::finish`].
#[derive(Debug)]
pub(crate) struct Completed {
    /// Headers of chunk 0.
    first: Headers,
    blob: Bytes,
    /// The last chunk and its headers (for an error about the stream).
    last: Headers,
    chunk: Chunk,
}

/// The in-order bytes of a stream so far: the first chunk as it came (a one-chunk stream is
/// never copied), then one growing buffer the later chunks are copied into as they arrive, so
/// that each chunk's frame buffer is freed at once and a stream costs its size once, not twice
/// (chunks, then their concatenation).
#[derive(Default)]
enum Assembled {
    #[default]
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Assembled {
    fn push(&mut self, chunk: Bytes) {
        *self = match std::mem::take(self) {
            Assembled::Empty => Assembled::One(chunk),
            Assembled::One(first) => {
                let mut buf = BytesMut::with_capacity(first.len() + chunk.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&chunk);
                Assembled::Many(buf)
            }
            Assembled::Many(mut buf) => {
                // amortised growth; large buffers grow in place (no copy, no double RSS)
                buf.extend_from_slice(&chunk);
                Assembled::Many(buf)
            }
        };
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Assembled::Empty => Bytes::new(),
            Assembled::One(b) => b,
            Assembled::Many(buf) => buf.freeze(),
        }
    }
}

struct RxStream {
    peer: String,
    first: Option<Headers>,
    parts: Assembled,
    received: u64,
    next_seq: u64,
    pending: BTreeMap<u64, (Bytes, u64, bool)>,
    pending_bytes: u64,
    unacked: u64,
    size: u64,
    final_seen: bool,
    /// When the last chunk arrived.
    last_seen: Instant,
    /// Channel and topic of the stream, for the log line of an expiry.
    what: String,
}

impl RxStream {
    fn buffered(&self) -> u64 {
        self.received + self.pending_bytes
    }
}

#[derive(Default)]
struct State {
    open: HashMap<(String, u64), RxStream>,
    /// Completed streams: key → (bytes, last sequence), to re-ACK duplicates.
    done: VecDeque<((String, u64), (u64, u64))>,
    replies: HashMap<String, PendingReply>,
}

impl State {
    fn buffered(&self) -> u64 {
        self.open.values().map(RxStream::buffered).sum()
    }
}

/// Reassembles incoming streams and keeps the bookkeeping of streamed requests.
pub(crate) struct StreamReceiver {
    limits: Limits,
    state: Mutex<State>,
}

/// A problem with one stream: reported to its sender, the stream is dropped.
struct Refusal {
    message: String,
    error_type: &'static str,
}

fn refuse(message: String, error_type: &'static str) -> Refusal {
    Refusal {
        message,
        error_type,
    }
}

impl StreamReceiver {
    pub(crate) fn new(limits: Limits) -> StreamReceiver {
        StreamReceiver {
            limits,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the streams that were arriving over the connection from `peer`.
    pub(crate) fn forget_peer(&self, peer: &str) {
        let mut state = self.lock();
        let before = state.open.len();
        state.open.retain(|_, s| s.peer != peer);
        let dropped = before - state.open.len();
        if dropped > 0 {
            log::info!("{dropped} unfinished stream(s) from {peer} dropped: connection closed");
        }
    }

    /// Handles one message on `sm__STREAM` that arrived from `peer`.
    pub(crate) fn on_message(
        &self,
        own: &Fqcn,
        peer: &Fqcn,
        msg: CellMessage,
    ) -> Vec<StreamAction> {
        let parsed = match StreamMessage::parse(&msg.headers) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("endpoint {own}: stream message from {peer} dropped: {e}");
                return Vec::new();
            }
        };
        match parsed {
            StreamMessage::Chunk(chunk) => self.on_chunk(own, peer, msg, chunk),
            StreamMessage::Ack(ack) => {
                log::debug!(
                    "endpoint {own}: stream {} acknowledged by {peer} up to byte {}",
                    ack.stream_id,
                    ack.offset
                );
                Vec::new()
            }
            StreamMessage::Error(e) => {
                log::warn!(
                    "endpoint {own}: {peer} reports an error on stream {}: {} ({})",
                    e.stream_id,
                    Bounded(e.message.as_deref().unwrap_or("")),
                    Bounded(e.error_type.as_deref().unwrap_or(""))
                );
                if let Some(origin) = msg.headers.origin() {
                    self.lock().open.remove(&(origin.to_owned(), e.stream_id));
                }
                Vec::new()
            }
            StreamMessage::Resume { stream_id, .. } => {
                log::debug!("endpoint {own}: resume message on stream {stream_id} ignored");
                Vec::new()
            }
        }
    }

    fn on_chunk(&self, own: &Fqcn, peer: &Fqcn, msg: CellMessage, c: Chunk) -> Vec<StreamAction> {
        let CellMessage { headers, payload } = msg;
        let Some(origin) = headers.origin().map(str::to_owned) else {
            log::warn!("endpoint {own}: stream chunk from {peer} without origin dropped");
            return Vec::new();
        };
        let data = match payload {
            Payload::Bytes(b) => b,
            Payload::None => Bytes::new(),
            Payload::Value(_) => {
                let r = refuse("chunk payload is not bytes".into(), "StreamError");
                return vec![self.error(own, peer, &headers, &c, r)];
            }
        };
        let key = (origin, c.stream_id);
        let mut state = self.lock();
        if let Some((_, (bytes, seq))) = state.done.iter().find(|(k, _)| *k == key) {
            // a duplicate of a stream already complete (a reliable sender's retry)
            let (bytes, seq) = (*bytes, *seq);
            drop(state);
            return vec![ack(own, peer, &headers, c.stream_id, bytes, seq)];
        }
        if !state.open.contains_key(&key) {
            if let Some(r) = self.check_new(&state, &c) {
                drop(state);
                return vec![self.error(own, peer, &headers, &c, r)];
            }
            state.open.insert(
                key.clone(),
                RxStream {
                    peer: peer.as_str().to_owned(),
                    first: None,
                    parts: Assembled::Empty,
                    received: 0,
                    next_seq: 0,
                    pending: BTreeMap::new(),
                    pending_bytes: 0,
                    unacked: 0,
                    size: c.size,
                    final_seen: false,
                    last_seen: Instant::now(),
                    what: format!("{}/{}", c.channel, c.topic),
                },
            );
        }
        let total_before = state.buffered();
        let outcome = match state.open.get_mut(&key) {
            Some(st) => {
                st.last_seen = Instant::now();
                self.accept_chunk(st, &headers, &c, data, total_before)
            }
            None => Err(refuse("stream state lost".into(), "StreamError")),
        };
        match outcome {
            Err(r) => {
                state.open.remove(&key);
                drop(state);
                vec![self.error(own, peer, &headers, &c, r)]
            }
            Ok(Progress::Nothing) => Vec::new(),
            Ok(Progress::Ack(bytes, seq)) => {
                drop(state);
                vec![ack(own, peer, &headers, c.stream_id, bytes, seq)]
            }
            Ok(Progress::Complete) => {
                let Some(st) = state.open.remove(&key) else {
                    return Vec::new();
                };
                let last_seq = st.next_seq.saturating_sub(1);
                if state.done.len() >= DONE_MEMORY {
                    state.done.pop_front();
                }
                state.done.push_back((key, (st.received, last_seq)));
                let mut actions =
                    vec![ack(own, peer, &headers, c.stream_id, st.received, last_seq)];
                if st.size > 0 && st.received != st.size {
                    drop(state);
                    let r = refuse(
                        format!("received {} bytes, expected {}", st.received, st.size),
                        "BlobSizeError",
                    );
                    actions.push(self.error(own, peer, &headers, &c, r));
                    return actions;
                }
                drop(state);
                match st.first {
                    Some(first) => actions.push(StreamAction::Decode(Box::new(Completed {
                        first,
                        blob: st.parts.into_bytes(),
                        last: headers,
                        chunk: c,
                    }))),
                    None => {
                        let r = refuse("stream without chunk 0".into(), "StreamError");
                        actions.push(self.error(own, peer, &headers, &c, r));
                    }
                }
                actions
            }
        }
    }

    /// Checks the limits for a stream that is about to start.
    fn check_new(&self, state: &State, c: &Chunk) -> Option<Refusal> {
        if state.open.len() >= self.limits.max_open {
            return Some(refuse(
                format!("too many open streams (limit {})", self.limits.max_open),
                "StreamError",
            ));
        }
        if c.size > self.limits.max_blob {
            return Some(refuse(
                format!(
                    "blob of {} bytes exceeds the limit of {} bytes",
                    c.size, self.limits.max_blob
                ),
                "BlobSizeError",
            ));
        }
        None
    }

    fn accept_chunk(
        &self,
        st: &mut RxStream,
        headers: &Headers,
        c: &Chunk,
        data: Bytes,
        total_before: u64,
    ) -> Result<Progress, Refusal> {
        let len = data.len() as u64;
        if c.seq < st.next_seq || st.pending.contains_key(&c.seq) {
            // duplicate: re-ACK what we have
            return Ok(match st.next_seq.checked_sub(1) {
                Some(last) => Progress::Ack(st.received, last),
                None => Progress::Nothing,
            });
        }
        if st.buffered() + len > self.limits.max_blob {
            return Err(refuse(
                format!("blob exceeds the limit of {} bytes", self.limits.max_blob),
                "BlobSizeError",
            ));
        }
        if total_before + len > self.limits.max_buffered {
            return Err(refuse(
                format!(
                    "streams being received exceed the buffer limit of {} bytes",
                    self.limits.max_buffered
                ),
                "StreamError",
            ));
        }
        if c.seq > st.next_seq {
            if st.pending.len() >= MAX_OUT_OF_ORDER {
                return Err(refuse(
                    format!("more than {MAX_OUT_OF_ORDER} chunks out of order"),
                    "StreamError",
                ));
            }
            st.pending_bytes += len;
            st.pending.insert(c.seq, (data, c.offset, c.is_final));
            return Ok(Progress::Nothing);
        }
        if c.seq == 0 {
            st.first = Some(headers.clone());
        }
        let mut next = Some((data, c.offset, c.is_final));
        while let Some((d, offset, is_final)) = next.take() {
            if offset != st.received {
                return Err(refuse(
                    format!(
                        "chunk {} at offset {offset}, expected offset {}",
                        st.next_seq, st.received
                    ),
                    "StreamError",
                ));
            }
            let n = d.len() as u64;
            st.received += n;
            st.unacked += n;
            st.parts.push(d);
            st.next_seq += 1;
            if st.size > 0 && st.received > st.size {
                return Err(refuse(
                    format!("received {} bytes, more than {}", st.received, st.size),
                    "BlobSizeError",
                ));
            }
            if is_final {
                st.final_seen = true;
                break;
            }
            if let Some(p) = st.pending.remove(&st.next_seq) {
                st.pending_bytes -= p.0.len() as u64;
                next = Some(p);
            }
        }
        if st.final_seen {
            return Ok(Progress::Complete);
        }
        if st.unacked >= RECEIVER_ACK_INTERVAL {
            st.unacked = 0;
            return Ok(Progress::Ack(st.received, st.next_seq - 1));
        }
        Ok(Progress::Nothing)
    }

    /// Decodes a complete stream (no lock held; on tokio's blocking pool when the blob has at
    /// least [`Limits::blocking_decode_min`] bytes, so that a big FOBS payload neither stalls
    /// the other streams nor an executor thread) and says what to do with it: deliver its
    /// logical message, hand a streamed reply to the sending side, or report an error to the
    /// stream's sender.
    pub(crate) async fn finish(
        &self,
        own: &Fqcn,
        peer: &Fqcn,
        done: Box<Completed>,
    ) -> Option<StreamAction> {
        let Completed {
            first,
            blob,
            last,
            chunk,
        } = *done;
        let blob_len = blob.len() as u64;
        let encoding = first
            .get(key::PAYLOAD_ENCODING)
            .and_then(Value::as_str)
            .map(str::to_owned);
        let decode = move || decode_payload_with_refs(encoding.as_deref(), blob);
        let decoded = if blob_len >= self.limits.blocking_decode_min as u64 {
            match tokio::task::spawn_blocking(decode).await {
                Ok(r) => r,
                Err(e) => {
                    let r = refuse(format!("decoding failed: {e}"), "StreamError");
                    return Some(self.error(own, peer, &last, &chunk, r));
                }
            }
        } else {
            decode()
        };
        let decoded = decoded.map_err(|e| refuse(e.to_string(), "StreamError"));
        let outcome = decoded.and_then(|(payload, refs)| {
            self.complete(&mut self.lock(), first, blob_len, payload, refs)
        });
        match outcome {
            Ok(action) => action,
            Err(r) => Some(self.error(own, peer, &last, &chunk, r)),
        }
    }

    /// Drops the streams from `peer` that received nothing for [`Limits::idle_timeout`] (a
    /// sender that went away mid-stream while its connection stays up), each logged with its
    /// stream id, origin, channel and topic. Returns how many were dropped.
    pub(crate) fn expire_idle(&self, own: &Fqcn, peer: &str) -> usize {
        let now = Instant::now();
        let timeout = self.limits.idle_timeout;
        let mut state = self.lock();
        let before = state.open.len();
        state.open.retain(|(origin, id), st| {
            let idle = st.peer == peer && now.duration_since(st.last_seen) >= timeout;
            if idle {
                log::warn!(
                    "endpoint {own}: stream {id} from {} via {peer} on {} dropped: \
                     nothing received for {timeout:?} ({} of {} bytes)",
                    Bounded(origin),
                    Bounded(&st.what),
                    st.received,
                    st.size
                );
            }
            !idle
        });
        before - state.open.len()
    }

    /// What to do with a decoded stream (the reply bookkeeping is kept under the lock): deliver
    /// its logical message, or hand a streamed reply to the sending side (`None` for something
    /// nobody waits for).
    fn complete(
        &self,
        state: &mut State,
        first: Headers,
        blob_len: u64,
        payload: Payload,
        refs: Vec<fedrun_fobs::download_ref::DownloadRef>,
    ) -> Result<Option<StreamAction>, Refusal> {
        let str_of = |k: &str| first.get(k).and_then(Value::as_str).map(str::to_owned);
        let channel = str_of(key::CHANNEL).unwrap_or_default();
        let topic = str_of(key::TOPIC).unwrap_or_default();
        let request_id = str_of(key::REQUEST_ID);
        let origin = first.origin().unwrap_or("").to_owned();
        let mut headers: Headers = first
            .into_iter()
            .filter(|(k, _)| {
                !k.starts_with(header::STREAM_PREFIX) && k.as_str() != header::DOWNLOAD_REFS
            })
            .collect();
        if !refs.is_empty() {
            // resolved by the receiving cell before anyone sees the message
            headers.insert(
                header::DOWNLOAD_REFS,
                fedrun_fobs::download_ref::refs_to_value(&refs),
            );
        }
        if channel == RETURN_ONLY_CHANNEL {
            let Some(request_id) = request_id else {
                log::warn!(
                    "streamed reply {} from {} without sm__ri dropped",
                    Bounded(&topic),
                    Bounded(&origin)
                );
                return Ok(None);
            };
            headers.set_payload_len(blob_len);
            return Ok(Some(StreamAction::Reply {
                request_id,
                reply: CellMessage { headers, payload },
            }));
        }
        headers.set_channel(channel.as_str());
        headers.set_topic(topic.as_str());
        headers.set_msg_type(MsgType::Req);
        headers.set_payload_len(blob_len);
        match request_id {
            Some(ri) => {
                let id = format!("{STREAM_REQ_ID_PREFIX}{ri}");
                headers.set_req_id(id.as_str());
                headers.set_reply_expected(true);
                let now = Instant::now();
                state
                    .replies
                    .retain(|_, p| now.duration_since(p.created) < PENDING_REPLY_TTL);
                if state.replies.len() >= MAX_PENDING_REPLIES {
                    return Err(refuse(
                        format!("more than {MAX_PENDING_REPLIES} streamed requests pending"),
                        "StreamError",
                    ));
                }
                state.replies.insert(
                    id,
                    PendingReply {
                        request_id: ri,
                        channel,
                        topic,
                        requester: origin,
                        created: now,
                    },
                );
            }
            None => {
                headers.remove(header::REQ_ID);
                headers.set_reply_expected(false);
            }
        }
        Ok(Some(StreamAction::Deliver(CellMessage {
            headers,
            payload,
        })))
    }

    /// The streamed request a reply with request id `id` answers, if it is one (removed: a
    /// request is answered once).
    pub(crate) fn take_reply(&self, id: &str) -> Option<PendingReply> {
        if !id.starts_with(STREAM_REQ_ID_PREFIX) {
            return None;
        }
        self.lock().replies.remove(id)
    }

    /// The chunk messages of the streamed reply `reply` to `pending`, from `own`: channel
    /// `return_only`, topic `"<channel>:<topic>"`, the request's `sm__ri`, the reply's return code,
    /// error and application headers, chunks of `params.chunk_size`. Not reliable (no retries): TCP
    /// delivers in order, and Python accepts unreliable replies.
    pub(crate) fn reply_chunks(
        &self,
        own: &Fqcn,
        pending: &PendingReply,
        reply: &CellMessage,
        params: &ChunkParams,
    ) -> Result<(Fqcn, Vec<CellMessage>), CellReturnCode> {
        let requester = Fqcn::new(pending.requester.as_str()).map_err(|e| {
            log::warn!("endpoint {own}: streamed reply to an invalid origin: {e}");
            CellReturnCode::InvalidTarget
        })?;
        // as segments: a big `bytes` value (a download item, an array) is sliced into the
        // chunks where it lies, never copied into one encoding buffer first
        let encoded = ref_datums(&reply.headers)
            .and_then(|refs| encode_payload_body_with(&reply.payload, &refs));
        let (encoding, blob) = encoded.map_err(|e| {
            log::warn!("endpoint {own}: streamed reply to {requester} not sent: {e}");
            CellReturnCode::CommError
        })?;
        let stream_id = params.stream_id;
        let chunk_size = params.chunk_size.max(1);
        let sender = reply.headers.origin().unwrap_or(own.as_str()).to_owned();
        let code = reply.return_code();
        let mut pieces: Vec<Bytes> = (0..blob.len())
            .step_by(chunk_size)
            .map(|at| blob.slice_bytes(at, at.saturating_add(chunk_size)))
            .collect();
        if pieces.is_empty() {
            pieces.push(Bytes::new());
        }
        let last = pieces.len() - 1;
        let now = epoch_secs();
        let mut offset = 0u64;
        let mut chunks = Vec::with_capacity(pieces.len());
        for (i, piece) in pieces.into_iter().enumerate() {
            let mut h: Headers = reply
                .headers
                .app_headers()
                .filter(|(k, _)| *k != header::DOWNLOAD_REFS) // local only: now datums
                .map(|(k, v)| (k.to_owned(), v.clone()))
                .collect();
            h.insert(header::RETURN_CODE, code.as_str());
            if let Some(e) = reply.headers.error() {
                h.insert(header::ERROR, e);
            }
            h.set_req_id("");
            h.insert(key::REQUEST_ID, pending.request_id.as_str());
            h.insert(key::PAYLOAD_ENCODING, encoding.as_str());
            h.insert(key::CHANNEL, RETURN_ONLY_CHANNEL);
            h.insert(key::TOPIC, format!("{}:{}", pending.channel, pending.topic));
            h.insert(key::SIZE, blob.len());
            h.insert(key::ID, stream_id);
            let dt = if i == last {
                DataType::Final
            } else {
                DataType::Chunk
            };
            h.insert(key::DATA_TYPE, u64::from(dt.as_u8()));
            h.insert(key::SEQ, i);
            h.insert(key::OFFSET, offset);
            h.insert(key::RELIABLE, false);
            h.insert(key::OPTIONAL, true);
            h.insert(key::CHUNK_SIZE, chunk_size);
            h.insert(key::WINDOW_SIZE, params.window_size);
            if i == 0 {
                h.insert(key::ACK_INTERVAL, RECEIVER_ACK_INTERVAL);
            }
            h.set_channel(STREAM_CHANNEL);
            h.set_topic(TOPIC_DATA);
            h.set_origin(sender.as_str());
            h.set_destination(requester.as_str());
            h.set_from(sender.as_str());
            h.set_to(requester.as_str());
            h.set_msg_type(MsgType::Req);
            h.set_route([(sender.as_str(), now)]);
            h.set_secure(false);
            h.set_optional(true);
            h.set_reply_expected(false);
            // the key order of the spec-only foreign cell's replies, which NVFlare accepted
            h.set_payload_encoding(PayloadEncoding::Bytes);
            h.set_payload_len(piece.len() as u64);
            h.set_send_time(now);
            offset += piece.len() as u64;
            chunks.push(CellMessage {
                headers: h,
                payload: Payload::Bytes(piece),
            });
        }
        Ok((requester, chunks))
    }

    /// The `sm__ERROR` control message about the stream of `c` (the transport also sends its
    /// `sm__ACK`-topic copy, see [`error_pair`]).
    fn error(
        &self,
        own: &Fqcn,
        peer: &Fqcn,
        headers: &Headers,
        c: &Chunk,
        r: Refusal,
    ) -> StreamAction {
        log::warn!(
            "endpoint {own}: stream {} from {} via {peer} refused: {}",
            c.stream_id,
            Bounded(headers.origin().unwrap_or("")),
            r.message
        );
        let sm = vec![
            (key::ID, Value::from(c.stream_id)),
            (
                key::DATA_TYPE,
                Value::from(u64::from(DataType::Error.as_u8())),
            ),
            (key::ERROR_MESSAGE, Value::from(r.message)),
            (key::ERROR_TYPE, Value::from(r.error_type)),
            (key::CHANNEL, Value::from(c.channel.as_str())),
            (key::TOPIC, Value::from(c.topic.as_str())),
            (
                key::REQUEST_ID,
                c.request_id.as_deref().map_or(Value::Nil, Value::from),
            ),
        ];
        StreamAction::Control(control(own, peer, headers, TOPIC_ERROR, sm))
    }
}

/// The `sm__ACK`-topic copy of an `sm__ERROR` control message (NVFlare 2.9 sends both).
pub(crate) fn error_pair(error: &Headers) -> Option<Headers> {
    if error.topic() != Some(TOPIC_ERROR) {
        return None;
    }
    let mut copy = error.clone();
    copy.set_topic(TOPIC_ACK);
    Some(copy)
}

/// The request id of a reply to a streamed request (`sm__ri:<id>`), if `msg` is one.
pub(crate) fn is_stream_reply_id(msg: &CellMessage) -> Option<&str> {
    if msg.headers.msg_type() != Some(MsgType::Reply) {
        return None;
    }
    msg.headers
        .req_id()
        .filter(|id| id.starts_with(STREAM_REQ_ID_PREFIX))
}

enum Progress {
    Nothing,
    Ack(u64, u64),
    Complete,
}

fn ack(
    own: &Fqcn,
    peer: &Fqcn,
    headers: &Headers,
    stream_id: u64,
    bytes: u64,
    seq: u64,
) -> StreamAction {
    let sm = vec![
        (key::ID, Value::from(stream_id)),
        (
            key::DATA_TYPE,
            Value::from(u64::from(DataType::Ack.as_u8())),
        ),
        (key::OFFSET, Value::from(bytes)),
        (key::SEQ, Value::from(seq)),
    ];
    StreamAction::Control(control(own, peer, headers, TOPIC_ACK, sm))
}

/// A control message (ACK/error, no payload) about the stream whose chunk had `chunk` headers,
/// from the cell it was addressed to, back to its origin over the connection from `peer`.
fn control(
    own: &Fqcn,
    peer: &Fqcn,
    chunk: &Headers,
    topic: &str,
    sm: Vec<(&'static str, Value)>,
) -> Headers {
    let now = epoch_secs();
    let sender = chunk.destination().unwrap_or(own.as_str()).to_owned();
    let mut h = Headers::new();
    for (k, v) in sm {
        if !v.is_nil() {
            h.insert(k, v);
        }
    }
    h.set_reply_expected(false);
    h.set_optional(true);
    h.set_secure(false);
    h.set_topic(topic);
    h.set_channel(STREAM_CHANNEL);
    h.set_destination(chunk.origin().unwrap_or(peer.as_str()));
    h.set_from(own.as_str());
    h.set_to(peer.as_str());
    h.set_origin(sender.as_str());
    h.set_msg_type(MsgType::Req);
    h.set_route([(sender.as_str(), now)]);
    if sender != own.as_str() {
        h.push_route(own.as_str(), now);
    }
    // NVFlare's key order for ACKs
    h.set_payload_encoding(PayloadEncoding::None);
    h.set_payload_len(0);
    h.set_send_time(now);
    h
}

impl PendingReply {
    /// The logical channel and topic of the streamed request.
    pub(crate) fn describe(&self) -> String {
        format!("{}/{} from {}", self.channel, self.topic, self.requester)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn receiver() -> StreamReceiver {
        StreamReceiver::new(Limits {
            max_blob: 1 << 32,
            max_buffered: 1 << 32,
            max_open: 8,
            idle_timeout: Duration::from_secs(60),
            blocking_decode_min: 1 << 20,
        })
    }

    fn params() -> ChunkParams {
        ChunkParams {
            stream_id: 7,
            chunk_size: SEND_CHUNK_SIZE,
            window_size: SEND_WINDOW_SIZE,
        }
    }

    fn pending() -> PendingReply {
        PendingReply {
            request_id: "ri".into(),
            channel: "aux_communication".into(),
            topic: "ping".into(),
            requester: "server.job1".into(),
            created: Instant::now(),
        }
    }

    #[test]
    fn big_reply_is_cut_into_1_mib_chunks_with_offsets_and_one_final() {
        let own = Fqcn::new("site-1.job1").unwrap();
        let blob = Bytes::from(vec![5u8; 2 * SEND_CHUNK_SIZE + 10]);
        let mut reply = CellMessage::new(Payload::Bytes(blob.clone()));
        reply.headers.set_origin("site-1.job1");
        reply.headers.insert("project_name", "p");
        let (to, chunks) = receiver()
            .reply_chunks(&own, &pending(), &reply, &params())
            .unwrap();
        assert_eq!(to.as_str(), "server.job1");
        assert_eq!(chunks.len(), 3);
        let mut joined = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let StreamMessage::Chunk(p) = StreamMessage::parse(&c.headers).unwrap() else {
                panic!("not a chunk");
            };
            assert_eq!(p.seq, i as u64);
            assert_eq!(p.offset, (i * SEND_CHUNK_SIZE) as u64);
            assert_eq!(p.size, blob.len() as u64);
            assert_eq!(p.is_final, i == 2);
            assert_eq!(p.ack_interval.is_some(), i == 0);
            assert_eq!(p.channel, RETURN_ONLY_CHANNEL);
            assert_eq!(p.topic, "aux_communication:ping");
            assert_eq!(p.request_id.as_deref(), Some("ri"));
            assert_eq!(
                c.headers.get("project_name").and_then(Value::as_str),
                Some("p")
            );
            joined.extend_from_slice(c.payload.as_bytes().unwrap());
        }
        assert_eq!(joined, blob.to_vec());
    }

    #[test]
    fn a_big_bytes_value_in_a_fobs_reply_is_sliced_into_the_chunks_not_copied() {
        let own = Fqcn::new("site-1.job1").unwrap();
        let item = Bytes::from(vec![9u8; 3 * SEND_CHUNK_SIZE]);
        let mut body = fedrun_core::Map::new();
        body.insert("status", "ok");
        body.insert("data", Value::Array(vec![Value::Bin(item.clone())]));
        let mut reply = CellMessage::new(Payload::value(Value::Map(body)));
        reply.headers.set_origin("site-1.job1");
        let (_, chunks) = receiver()
            .reply_chunks(&own, &pending(), &reply, &params())
            .unwrap();
        let range = item.as_ptr_range();
        let inside = chunks
            .iter()
            .filter_map(|c| c.payload.as_bytes())
            .filter(|b| range.contains(&b.as_ptr()))
            .count();
        // every whole chunk within the item points into the item's own buffer
        assert!(
            inside >= 2,
            "only {inside} chunk(s) share the item's buffer"
        );
        let joined: Vec<u8> = chunks
            .iter()
            .flat_map(|c| c.payload.as_bytes().unwrap().to_vec())
            .collect();
        let (_, whole) = crate::message::encode_payload(&reply.payload).unwrap();
        assert_eq!(joined, whole.to_vec());
    }

    #[test]
    fn empty_reply_is_one_empty_final_chunk() {
        let own = Fqcn::new("site-1.job1").unwrap();
        let (_, chunks) = receiver()
            .reply_chunks(&own, &pending(), &CellMessage::empty(), &params())
            .unwrap();
        assert_eq!(chunks.len(), 1);
        let StreamMessage::Chunk(p) = StreamMessage::parse(&chunks[0].headers).unwrap() else {
            panic!("not a chunk");
        };
        assert!(p.is_final && p.size == 0);
        assert_eq!(p.payload_encoding, Some(PayloadEncoding::None));
    }

    #[test]
    fn one_chunk_is_kept_as_it_came_and_more_are_joined_in_order() {
        let one = Bytes::from_static(b"abc");
        let mut a = Assembled::default();
        a.push(one.clone());
        assert_eq!(
            a.into_bytes().as_ptr(),
            one.as_ptr(),
            "no copy for one chunk"
        );
        let mut a = Assembled::default();
        for piece in [&b"ab"[..], b"", b"cde", b"f"] {
            a.push(Bytes::copy_from_slice(piece));
        }
        assert_eq!(&a.into_bytes()[..], b"abcdef");
        assert!(Assembled::default().into_bytes().is_empty());
    }

    #[test]
    fn only_stream_reply_ids_are_taken() {
        let r = receiver();
        assert!(r.take_reply("plain-uuid").is_none());
        assert!(r.take_reply("sm__ri:unknown").is_none());
    }
}
