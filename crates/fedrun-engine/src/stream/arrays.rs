//! Streaming a model's arrays: the piece format, the producer, and the client's slots.
//!
//! A model too large to ride inside a task (or a result) travels as a stream of its arrays'
//! `.npy` bytes, cut into chunks, through the engine's [`StreamProcessor`](super::StreamProcessor)
//! exactly as it would over a network. The task or result then carries the DXO without arrays
//! and the header [`MODEL_STREAM_HEADER`] naming the stream. This module holds what both ends
//! share: the channel and topics, the piece format ([`ArraysProducer`]), and the client side's
//! ready-made consumer factory ([`ModelSlots`]) that assembles the arrays of each stream into a
//! slot the client runner waits for. The server's consumer (incremental FedAvg) lives in
//! `fedrun-server`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use fedrun_cell::AbortSignal;
use fedrun_core::constants::header_key;
use fedrun_core::{FlContext, Map, NdArray, Shareable, StreamContext, Value};
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::stream::traits::{
    ConsumeResult, ConsumerFactory, EndStream, ObjectConsumer, ObjectProducer, Produced, StreamStep,
};

/// The task / result header naming the stream that carries the DXO's arrays.
pub const MODEL_STREAM_HEADER: &str = "fedrun.model_stream";
/// The stream channel of model transfers.
pub const MODEL_CHANNEL: &str = "fedrun.model";
/// The topic of the server's model going to a client.
pub const TOPIC_WEIGHTS: &str = "weights";
/// The topic of a client's result arrays going to the server.
pub const TOPIC_RESULT: &str = "result";
/// Stream-context key: the stream's id (what [`MODEL_STREAM_HEADER`] says).
pub const CTX_STREAM_ID: &str = "fedrun.stream_id";
/// Stream-context key: the sending site.
pub const CTX_SITE: &str = "fedrun.site";
/// Stream-context key: the DXO meta (sent before any chunk, e.g. `NUM_STEPS_CURRENT_ROUND`).
pub const CTX_META: &str = "fedrun.meta";
/// Stream-context key: the DXO kind.
pub const CTX_KIND: &str = "fedrun.kind";
/// Piece key: the array's name.
pub const KEY_NAME: &str = "name";
/// Piece key: the chunk's offset in the array's `.npy` bytes.
pub const KEY_OFFSET: &str = "offset";
/// Piece key: the array's `.npy` length.
pub const KEY_TOTAL: &str = "total";
/// Piece key: the chunk's bytes.
pub const KEY_DATA: &str = "data";
/// Piece key: true on the stream's last piece.
pub const KEY_LAST: &str = "last";
/// The default chunk size (1 MiB).
pub const MODEL_CHUNK_SIZE: usize = 1 << 20;

/// One piece, as read by a consumer.
#[derive(Debug)]
pub struct ArrayPiece {
    /// The array's name.
    pub name: String,
    /// The chunk's offset in the array's `.npy` bytes.
    pub offset: usize,
    /// The array's `.npy` length.
    pub total: usize,
    /// The chunk.
    pub data: bytes::Bytes,
    /// The stream's last piece.
    pub last: bool,
}

impl ArrayPiece {
    /// Reads a piece; every field must be present and the chunk must fit the array.
    ///
    /// # Errors
    ///
    /// A message naming the missing or bad field.
    pub fn read(piece: &Shareable) -> Result<ArrayPiece, String> {
        let name = piece.get(KEY_NAME).and_then(Value::as_str);
        let offset = piece.get(KEY_OFFSET).and_then(Value::as_u64);
        let total = piece.get(KEY_TOTAL).and_then(Value::as_u64);
        let data = piece.get(KEY_DATA).and_then(Value::as_bin);
        let last = piece.get(KEY_LAST).and_then(Value::as_bool);
        let (Some(name), Some(offset), Some(total), Some(data), Some(last)) =
            (name, offset, total, data, last)
        else {
            return Err("an array piece needs name, offset, total, data and last".to_owned());
        };
        let offset = usize::try_from(offset).map_err(|_| "offset too large".to_owned())?;
        let total = usize::try_from(total).map_err(|_| "total too large".to_owned())?;
        if offset.checked_add(data.len()).is_none_or(|end| end > total) {
            return Err(format!(
                "array '{name}': {} bytes at {offset} exceed its {total} bytes",
                data.len()
            ));
        }
        Ok(ArrayPiece {
            name: name.to_owned(),
            offset,
            total,
            data: data.clone(),
            last,
        })
    }
}

/// Streams named arrays: each array's `.npy` bytes in chunks (zero-copy slices), one piece at a
/// time; every receiver must answer each piece `OK`. Fortran-order arrays are sent in C order.
///
/// # Example
/// ```
/// use fedrun_core::NdArray;
/// use fedrun_engine::stream::ArraysProducer;
///
/// let w = NdArray::from_f32(&[4], &[1.0; 4]).unwrap();
/// let p = ArraysProducer::new(vec![("w".to_owned(), w)]).unwrap().with_chunk_size(8);
/// assert_eq!(p.total_bytes(), 144);
/// ```
pub struct ArraysProducer {
    arrays: Vec<(String, NdArray)>,
    index: usize,
    offset: usize,
    chunk_size: usize,
    timeout: Duration,
    done: bool,
}

impl ArraysProducer {
    /// A producer of `arrays`, in order, 1 MiB chunks, 300 s reply timeout.
    ///
    /// # Errors
    ///
    /// A message when an array's dtype has no fixed item size (it cannot be reordered).
    pub fn new(arrays: Vec<(String, NdArray)>) -> Result<ArraysProducer, String> {
        let arrays = arrays
            .into_iter()
            .map(|(n, a)| a.to_c_order().map(|a| (n, a)).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ArraysProducer {
            arrays,
            index: 0,
            offset: 0,
            chunk_size: MODEL_CHUNK_SIZE,
            timeout: Duration::from_secs(300),
            done: false,
        })
    }

    /// Sets the chunk size (at least 1 byte).
    pub fn with_chunk_size(mut self, size: usize) -> Self {
        self.chunk_size = size.max(1);
        self
    }

    /// Sets each piece's reply timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The `.npy` bytes to send in all.
    pub fn total_bytes(&self) -> usize {
        self.arrays.iter().map(|(_, a)| a.npy().len()).sum()
    }
}

impl ObjectProducer for ArraysProducer {
    fn produce<'a>(
        &'a mut self,
        _stream_ctx: &'a mut StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<Option<Produced>, String>> {
        Box::pin(async move {
            if self.done {
                return Ok(None);
            }
            let mut piece = Shareable::new();
            match self.arrays.get(self.index) {
                None => {
                    // no array at all: one empty last piece
                    piece.insert(KEY_NAME, "");
                    piece.insert(KEY_OFFSET, 0);
                    piece.insert(KEY_TOTAL, 0);
                    piece.insert(KEY_DATA, bytes::Bytes::new());
                    piece.insert(KEY_LAST, true);
                    self.done = true;
                }
                Some((name, array)) => {
                    let npy = array.npy();
                    let end = (self.offset + self.chunk_size).min(npy.len());
                    piece.insert(KEY_NAME, name.as_str());
                    piece.insert(KEY_OFFSET, self.offset);
                    piece.insert(KEY_TOTAL, npy.len());
                    piece.insert(KEY_DATA, npy.slice(self.offset..end));
                    self.offset = end;
                    if end == npy.len() {
                        self.index += 1;
                        self.offset = 0;
                    }
                    self.done = self.index == self.arrays.len();
                    piece.insert(KEY_LAST, self.done);
                }
            }
            Ok(Some(Produced::new(piece, self.timeout)))
        })
    }

    fn process_replies<'a>(
        &'a mut self,
        replies: &'a HashMap<String, Shareable>,
        _stream_ctx: &'a mut StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<StreamStep, String>> {
        Box::pin(async move {
            if replies.is_empty() {
                return Ok(StreamStep::Failed(Value::from("no receiver replied")));
            }
            let mut failed = Map::new();
            for (site, reply) in replies {
                let rc = reply.return_code();
                if !rc.is_ok() {
                    let why = reply
                        .header_or_none(header_key::ERROR)
                        .and_then(Value::as_str)
                        .map_or_else(|| rc.to_string(), |e| format!("{rc}: {e}"));
                    failed.insert(site.as_str(), why);
                }
            }
            if !failed.is_empty() {
                Ok(StreamStep::Failed(Value::Map(failed)))
            } else if self.done {
                Ok(StreamStep::Done(Value::from(true)))
            } else {
                Ok(StreamStep::Continue)
            }
        })
    }
}

/// Assembles one array's `.npy` bytes from its chunks (in order).
#[derive(Default)]
pub struct ArrayAssembler {
    current: Option<(String, BytesMut, usize)>,
}

impl ArrayAssembler {
    /// Adds a chunk; returns the array once its last byte arrived.
    ///
    /// # Errors
    ///
    /// A message for an out-of-order chunk, a size above `max_bytes`, or invalid `.npy` bytes.
    pub fn push(
        &mut self,
        piece: &ArrayPiece,
        max_bytes: usize,
    ) -> Result<Option<(String, NdArray)>, String> {
        if piece.total == 0 {
            return Ok(None);
        }
        if piece.offset == 0 {
            if piece.total > max_bytes {
                return Err(format!(
                    "array '{}' has {} bytes, above the limit of {max_bytes}",
                    piece.name, piece.total
                ));
            }
            self.current = Some((
                piece.name.clone(),
                BytesMut::with_capacity(piece.total),
                piece.total,
            ));
        }
        let Some((name, buf, total)) = self.current.as_mut() else {
            return Err(format!("array '{}' does not start at offset 0", piece.name));
        };
        if *name != piece.name || buf.len() != piece.offset || *total != piece.total {
            return Err(format!(
                "array '{}': chunk at {} out of order (have {} bytes of '{name}')",
                piece.name,
                piece.offset,
                buf.len()
            ));
        }
        buf.extend_from_slice(&piece.data);
        if buf.len() < *total {
            return Ok(None);
        }
        let Some((name, buf, _)) = self.current.take() else {
            return Ok(None);
        };
        let array = NdArray::from_npy(buf.freeze()).map_err(|e| e.to_string())?;
        Ok(Some((name, array)))
    }
}

/// The state of one slot.
#[derive(Clone, Debug)]
enum Slot {
    Filling,
    Ready(Arc<Map>),
    Failed(String),
}

struct SlotsInner {
    slots: Mutex<HashMap<String, watch::Sender<Slot>>>,
    max_array_bytes: usize,
}

/// The client's ready-made consumer factory for models streamed by the server: each stream (id
/// in its context's [`CTX_STREAM_ID`]) fills one slot with its arrays (name → ndarray); the
/// client runner [`take`](ModelSlots::take)s the slot named by a task's
/// [`MODEL_STREAM_HEADER`]. A slot nobody took is dropped when a newer stream completes.
///
/// # Example
/// ```
/// use fedrun_engine::stream::{ModelSlots, MODEL_CHANNEL, TOPIC_WEIGHTS, RegisterStreamProcessing};
///
/// let slots = ModelSlots::new();
/// let msg = RegisterStreamProcessing::new(MODEL_CHANNEL, TOPIC_WEIGHTS, slots.clone());
/// assert_eq!(msg.topic, "weights");
/// ```
#[derive(Clone)]
pub struct ModelSlots {
    inner: Arc<SlotsInner>,
}

impl std::fmt::Debug for ModelSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSlots").finish_non_exhaustive()
    }
}

impl Default for ModelSlots {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelSlots {
    /// Slots accepting arrays up to 64 GiB each.
    pub fn new() -> Self {
        ModelSlots {
            inner: Arc::new(SlotsInner {
                slots: Mutex::new(HashMap::new()),
                max_array_bytes: 64 << 30,
            }),
        }
    }

    fn slot(&self, id: &str) -> watch::Receiver<Slot> {
        let Ok(mut slots) = self.inner.slots.lock() else {
            let (_tx, rx) = watch::channel(Slot::Failed("slot table poisoned".to_owned()));
            return rx;
        };
        slots
            .entry(id.to_owned())
            .or_insert_with(|| watch::channel(Slot::Filling).0)
            .subscribe()
    }

    fn set(&self, id: &str, state: Slot) {
        if let Ok(mut slots) = self.inner.slots.lock() {
            if matches!(state, Slot::Ready(_)) {
                // a completed model nobody waits for is stale once a newer one arrives
                slots.retain(|k, tx| k == id || matches!(*tx.borrow(), Slot::Filling));
            }
            slots
                .entry(id.to_owned())
                .or_insert_with(|| watch::channel(Slot::Filling).0)
                .send_replace(state);
        }
    }

    /// Waits until the stream `id` has delivered all its arrays and takes them (name →
    /// ndarray). Gives up after `deadline` or when `abort` fires.
    ///
    /// # Errors
    ///
    /// A message saying why: the stream failed, the deadline passed, or the abort.
    pub async fn take(
        &self,
        id: &str,
        deadline: Duration,
        abort: &AbortSignal,
    ) -> Result<Map, String> {
        let mut rx = self.slot(id);
        let wait = async {
            loop {
                let state = rx.borrow_and_update().clone();
                match state {
                    Slot::Ready(map) => return Ok(map),
                    Slot::Failed(why) => return Err(why),
                    Slot::Filling => {}
                }
                if rx.changed().await.is_err() {
                    return Err("the slot was dropped".to_owned());
                }
            }
        };
        let out = tokio::select! {
            biased;
            _ = abort.triggered() => Err(format!("aborted while waiting for model stream {id}")),
            r = tokio::time::timeout(deadline, wait) => r.unwrap_or_else(|_| Err(format!(
                "model stream {id} did not complete within {deadline:?}"
            ))),
        };
        if let Ok(mut slots) = self.inner.slots.lock() {
            slots.remove(id);
        }
        out.map(|map| Arc::try_unwrap(map).unwrap_or_else(|shared| (*shared).clone()))
    }
}

struct SlotConsumer {
    slots: ModelSlots,
    id: String,
    assembler: ArrayAssembler,
    arrays: Map,
    complete: bool,
}

impl ObjectConsumer for SlotConsumer {
    fn consume<'a>(
        &'a mut self,
        request: Shareable,
        _stream_ctx: &'a mut StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<ConsumeResult, String>> {
        Box::pin(async move {
            let piece = ArrayPiece::read(&request)?;
            if let Some((name, array)) = self
                .assembler
                .push(&piece, self.slots.inner.max_array_bytes)?
            {
                self.arrays.insert(name, array);
            }
            if piece.last {
                self.complete = true;
                let arrays = std::mem::take(&mut self.arrays);
                self.slots.set(&self.id, Slot::Ready(Arc::new(arrays)));
                return Ok(ConsumeResult::stop(None));
            }
            Ok(ConsumeResult::keep_going(None))
        })
    }

    fn finalize<'a>(
        &'a mut self,
        stream_ctx: &'a StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if !self.complete {
                let rc = stream_ctx.rc().unwrap_or("?").to_owned();
                self.slots.set(
                    &self.id,
                    Slot::Failed(format!("model stream {} ended early ({rc})", self.id)),
                );
            }
            Ok(())
        })
    }
}

impl ConsumerFactory for ModelSlots {
    fn get_consumer<'a>(
        &'a self,
        stream_ctx: &'a StreamContext,
        _ctx: &'a FlContext,
        _end: EndStream,
    ) -> BoxFuture<'a, Result<Box<dyn ObjectConsumer>, String>> {
        Box::pin(async move {
            let Some(id) = stream_ctx.get(CTX_STREAM_ID).and_then(Value::as_str) else {
                return Err(format!(
                    "a model stream needs {CTX_STREAM_ID} in its context"
                ));
            };
            self.set(id, Slot::Filling);
            Ok(Box::new(SlotConsumer {
                slots: self.clone(),
                id: id.to_owned(),
                assembler: ArrayAssembler::default(),
                arrays: Map::new(),
                complete: false,
            }) as Box<dyn ObjectConsumer>)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn produced_pieces_reassemble_into_the_same_arrays() {
        let a = NdArray::from_f32(&[100], &[1.5; 100]).unwrap();
        let b = NdArray::from_f64(&[3], &[2.0, 3.0, 4.0]).unwrap();
        let mut p = ArraysProducer::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())])
            .unwrap()
            .with_chunk_size(64);
        let mut sctx = StreamContext::new();
        let ctx = FlContext::new();
        let mut asm = ArrayAssembler::default();
        let mut got = Vec::new();
        let mut last = false;
        while let Some(produced) = p.produce(&mut sctx, &ctx).await.unwrap() {
            let piece = ArrayPiece::read(&produced.request).unwrap();
            assert!(!last, "nothing after the last piece");
            last = piece.last;
            if let Some(done) = asm.push(&piece, usize::MAX).unwrap() {
                got.push(done);
            }
        }
        assert!(last);
        assert_eq!(got, vec![("a".to_owned(), a), ("b".to_owned(), b)]);
    }

    #[tokio::test]
    async fn out_of_order_or_oversized_chunks_are_refused() {
        let a = NdArray::from_f32(&[100], &[1.5; 100]).unwrap();
        let mut p = ArraysProducer::new(vec![("a".into(), a)])
            .unwrap()
            .with_chunk_size(64);
        let (mut sctx, ctx) = (StreamContext::new(), FlContext::new());
        let first = p.produce(&mut sctx, &ctx).await.unwrap().unwrap();
        let second = p.produce(&mut sctx, &ctx).await.unwrap().unwrap();
        let mut asm = ArrayAssembler::default();
        assert!(asm
            .push(&ArrayPiece::read(&second.request).unwrap(), usize::MAX)
            .is_err());
        assert!(asm
            .push(&ArrayPiece::read(&first.request).unwrap(), 10)
            .is_err());
    }

    #[tokio::test]
    async fn take_gives_up_on_abort_and_reports_failed_streams() {
        let slots = ModelSlots::new();
        let abort = AbortSignal::new();
        abort.trigger();
        let err = slots
            .take("x", Duration::from_secs(5), &abort)
            .await
            .unwrap_err();
        assert!(err.contains("aborted"), "{err}");
        slots.set("y", Slot::Failed("broken".into()));
        let err = slots
            .take("y", Duration::from_secs(5), &AbortSignal::new())
            .await
            .unwrap_err();
        assert_eq!(err, "broken");
        let err = slots
            .take("z", Duration::from_millis(20), &AbortSignal::new())
            .await
            .unwrap_err();
        assert!(err.contains("did not complete"), "{err}");
    }
}
