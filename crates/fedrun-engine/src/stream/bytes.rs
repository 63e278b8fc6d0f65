//! A ready-made producer/consumer pair that streams bytes: a file, any reader, or an in-memory
//! buffer, in chunks of a configurable size (1 MiB by default).
//!
//! The producer reads one chunk at a time, only when the streamer asks for the next piece, so a
//! file is never held in memory as a whole; reads from files and readers run on tokio's blocking
//! pool so they do not stall the actor thread. An in-memory [`Bytes`] is cut into zero-copy
//! slices. On each receiver the consumer appends the chunks to a [`ByteSink`] (memory, a file or
//! any writer) and, when the stream is over, hands a [`ReceivedBytes`] to the channel returned
//! with its factory.
//!
//! # Wire format
//!
//! This is fedrun's own format (not NVFlare's `FileStreamer`'s), carried in the streamer's
//! pieces:
//!
//! - each piece is a Shareable with `data` (bytes), `offset` (the position of its first byte)
//!   and `last` (true on the final chunk; an empty final chunk is sent when a reader of unknown
//!   length ends exactly on a chunk boundary);
//! - the stream context carries `chunk_size` and, when known, `size` (the total length);
//! - the consumer checks that offsets are contiguous and, when `size` is known, that the total
//!   matches; it ends the stream itself after the last chunk, replying `received` (bytes), so
//!   the producer's outcome is `OK` with `{site: received}` once every target has the whole
//!   object.
//!
//! # Example
//!
//! The producer alone, driven by hand (the streamer does this for you):
//!
//! ```
//! use fedrun_core::{FlContext, StreamContext};
//! use fedrun_engine::stream::{BytesProducer, ObjectProducer};
//!
//! actix::System::new().block_on(async {
//!     let mut producer = BytesProducer::from_bytes(vec![7u8; 10].into()).with_chunk_size(4);
//!     let (mut stream_ctx, ctx) = (StreamContext::new(), FlContext::new());
//!     let mut sizes = Vec::new();
//!     while let Some(piece) = producer.produce(&mut stream_ctx, &ctx).await.unwrap() {
//!         sizes.push(piece.request.get("data").unwrap().as_bin().unwrap().len());
//!     }
//!     assert_eq!(sizes, [4, 4, 2]);
//!     assert_eq!(stream_ctx.get("size").and_then(|v| v.as_u64()), Some(10));
//! });
//! ```

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fedrun_core::constants::header_key;
use fedrun_core::{FlContext, Map, ReturnCode, Shareable, StreamContext, Value};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::stream::traits::{
    ConsumeResult, ConsumerFactory, EndStream, ObjectConsumer, ObjectProducer, Produced, StreamStep,
};

/// The default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;

/// The default time to wait for every receiver's reply to one chunk.
pub const DEFAULT_CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// Piece key: the chunk's bytes.
pub const KEY_DATA: &str = "data";
/// Piece key: the position of the chunk's first byte.
pub const KEY_OFFSET: &str = "offset";
/// Piece key: true on the final chunk.
pub const KEY_LAST: &str = "last";
/// Reply key: the bytes a receiver got in total (on the reply to the last chunk).
pub const KEY_RECEIVED: &str = "received";
/// Stream-context key: the total length, when known.
pub const CTX_SIZE: &str = "size";
/// Stream-context key: the chunk size.
pub const CTX_CHUNK_SIZE: &str = "chunk_size";

enum Source {
    Memory(Bytes),
    Reader(Option<Box<dyn Read + Send>>),
}

/// Streams bytes in chunks (see the [module doc](self)).
pub struct BytesProducer {
    source: Source,
    size: Option<u64>,
    chunk_size: usize,
    timeout: Duration,
    offset: u64,
    last_sent: bool,
}

impl fmt::Debug for BytesProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BytesProducer")
            .field("size", &self.size)
            .field("chunk_size", &self.chunk_size)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl BytesProducer {
    fn with_source(source: Source, size: Option<u64>) -> Self {
        BytesProducer {
            source,
            size,
            chunk_size: DEFAULT_CHUNK_SIZE,
            timeout: DEFAULT_CHUNK_TIMEOUT,
            offset: 0,
            last_sent: false,
        }
    }

    /// Streams an in-memory buffer; chunks are zero-copy slices of it.
    pub fn from_bytes(data: Bytes) -> Self {
        let size = data.len() as u64;
        Self::with_source(Source::Memory(data), Some(size))
    }

    /// Streams a file, read one chunk at a time.
    ///
    /// # Errors
    ///
    /// The file cannot be opened or its length read.
    pub fn from_file(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let file = File::open(path.as_ref())?;
        let size = file.metadata()?.len();
        Ok(Self::with_source(
            Source::Reader(Some(Box::new(file))),
            Some(size),
        ))
    }

    /// Streams whatever `reader` yields until it ends, one chunk at a time. `size`, when given,
    /// is announced to the receivers, who check it.
    pub fn from_reader(reader: impl Read + Send + 'static, size: Option<u64>) -> Self {
        Self::with_source(Source::Reader(Some(Box::new(reader))), size)
    }

    /// Sets the chunk size in bytes (at least 1).
    pub fn with_chunk_size(mut self, chunk_size: usize) -> Self {
        self.chunk_size = chunk_size.max(1);
        self
    }

    /// Sets how long to wait for every receiver's reply to one chunk (zero fails the stream).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The next chunk and whether it is the last one.
    async fn next_chunk(&mut self) -> Result<(Bytes, bool), String> {
        let want = self.chunk_size;
        match &mut self.source {
            Source::Memory(data) => {
                let n = want.min(data.len());
                let chunk = data.split_to(n);
                Ok((chunk, data.is_empty()))
            }
            Source::Reader(slot) => {
                let mut reader = slot
                    .take()
                    .ok_or("the reader was lost by an earlier failed read")?;
                let (reader, filled) = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; want];
                    let mut filled = 0;
                    let result = loop {
                        if filled == want {
                            break Ok(());
                        }
                        match reader.read(&mut buf[filled..]) {
                            Ok(0) => break Ok(()),
                            Ok(n) => filled += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => break Err(e),
                        }
                    };
                    buf.truncate(filled);
                    (reader, result.map(|()| buf))
                })
                .await
                .map_err(|e| format!("the read task failed: {e}"))?;
                *slot = Some(reader);
                let buf = filled.map_err(|e| format!("read failed: {e}"))?;
                let n = buf.len() as u64;
                let short = buf.len() < want;
                let at_known_end = self.size.is_some_and(|size| self.offset + n >= size);
                Ok((Bytes::from(buf), short || at_known_end))
            }
        }
    }
}

impl ObjectProducer for BytesProducer {
    fn produce<'a>(
        &'a mut self,
        stream_ctx: &'a mut StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<Option<Produced>, String>> {
        Box::pin(async move {
            if self.last_sent {
                return Ok(None);
            }
            if self.offset == 0 {
                stream_ctx.set(CTX_CHUNK_SIZE, self.chunk_size);
                if let Some(size) = self.size {
                    stream_ctx.set(CTX_SIZE, size);
                }
            }
            let (chunk, last) = self.next_chunk().await?;
            if let Some(size) = self.size {
                let end = self.offset + chunk.len() as u64;
                if end > size || (last && end != size) {
                    return Err(format!(
                        "the source has {end} bytes or more, but {size} were announced"
                    ));
                }
            }
            let mut piece = Shareable::new();
            piece.insert(KEY_OFFSET, self.offset);
            piece.insert(KEY_LAST, last);
            self.offset += chunk.len() as u64;
            piece.insert(KEY_DATA, chunk);
            self.last_sent = last;
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
            let mut received = Map::new();
            for (site, reply) in replies {
                let rc = reply.return_code();
                if !rc.is_ok() {
                    let why = reply
                        .header_or_none(header_key::ERROR)
                        .and_then(Value::as_str)
                        .map_or_else(|| rc.to_string(), |e| format!("{rc}: {e}"));
                    failed.insert(site.as_str(), why);
                } else if self.last_sent {
                    let got = reply.get(KEY_RECEIVED).and_then(Value::as_u64);
                    if got != Some(self.offset) {
                        failed.insert(
                            site.as_str(),
                            format!("received {got:?} bytes of {}", self.offset),
                        );
                    } else {
                        received.insert(site.as_str(), self.offset);
                    }
                }
            }
            if !failed.is_empty() {
                Ok(StreamStep::Failed(Value::Map(failed)))
            } else if self.last_sent {
                Ok(StreamStep::Done(Value::Map(received)))
            } else {
                Ok(StreamStep::Continue)
            }
        })
    }
}

/// Where a receiver puts the bytes of one stream.
pub enum ByteSink {
    /// Reassemble in memory; [`ReceivedBytes::data`] has the object.
    Memory,
    /// Write to this file (created or truncated); removed again if the stream fails.
    File(PathBuf),
    /// Write to any writer (e.g. a hasher, a socket, `std::io::sink()`).
    Writer(Box<dyn Write + Send>),
}

impl fmt::Debug for ByteSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ByteSink::Memory => f.write_str("ByteSink::Memory"),
            ByteSink::File(p) => write!(f, "ByteSink::File({})", p.display()),
            ByteSink::Writer(_) => f.write_str("ByteSink::Writer"),
        }
    }
}

/// One stream's bytes, as a receiver got them.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedBytes {
    /// How the stream ended on this receiver (`OK` when the whole object arrived).
    pub rc: ReturnCode,
    /// The stream context (the sender's entries, `__channel__`, `__topic__`, `__RC__`).
    pub stream_ctx: StreamContext,
    /// Bytes received.
    pub size: u64,
    /// The object, for a [`ByteSink::Memory`] stream that ended with `OK`.
    pub data: Option<Bytes>,
    /// The file, for a [`ByteSink::File`] stream that ended with `OK`.
    pub path: Option<PathBuf>,
}

enum SinkState {
    Memory(BytesMut),
    File(PathBuf, Option<BufWriter<File>>),
    Writer(Option<Box<dyn Write + Send>>),
}

/// Writes `chunk` to `writer` on the blocking pool; the writer comes back unless the task died.
async fn write_blocking<W: Write + Send + 'static>(
    mut writer: W,
    chunk: Bytes,
    flush: bool,
) -> Result<W, String> {
    tokio::task::spawn_blocking(move || {
        writer.write_all(&chunk)?;
        if flush {
            writer.flush()?;
        }
        Ok::<W, std::io::Error>(writer)
    })
    .await
    .map_err(|e| format!("the write task failed: {e}"))?
    .map_err(|e| format!("write failed: {e}"))
}

/// Receives one stream of bytes (made by [`BytesConsumerFactory`]).
pub struct BytesConsumer {
    sink: SinkState,
    received: u64,
    size: Option<u64>,
    done: mpsc::UnboundedSender<ReceivedBytes>,
}

impl fmt::Debug for BytesConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BytesConsumer")
            .field("received", &self.received)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl BytesConsumer {
    async fn append(&mut self, chunk: Bytes, last: bool) -> Result<(), String> {
        match &mut self.sink {
            SinkState::Memory(buf) => {
                buf.extend_from_slice(&chunk);
                Ok(())
            }
            SinkState::File(_, slot) => {
                let w = slot
                    .take()
                    .ok_or("the file was lost by an earlier failure")?;
                *slot = Some(write_blocking(w, chunk, last).await?);
                Ok(())
            }
            SinkState::Writer(slot) => {
                let w = slot
                    .take()
                    .ok_or("the writer was lost by an earlier failure")?;
                *slot = Some(write_blocking(w, chunk, last).await?);
                Ok(())
            }
        }
    }
}

impl ObjectConsumer for BytesConsumer {
    fn consume<'a>(
        &'a mut self,
        request: Shareable,
        _stream_ctx: &'a mut StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<ConsumeResult, String>> {
        Box::pin(async move {
            let chunk = request
                .get(KEY_DATA)
                .and_then(Value::as_bin)
                .cloned()
                .ok_or("the piece has no 'data' bytes")?;
            let offset = request
                .get(KEY_OFFSET)
                .and_then(Value::as_u64)
                .ok_or("the piece has no 'offset'")?;
            let last = request
                .get(KEY_LAST)
                .and_then(Value::as_bool)
                .ok_or("the piece has no 'last'")?;
            if offset != self.received {
                return Err(format!(
                    "chunk at offset {offset}, expected {}",
                    self.received
                ));
            }
            let end = self.received + chunk.len() as u64;
            if let Some(size) = self.size {
                if end > size || (last && end != size) {
                    return Err(format!("{end} bytes received, {size} announced"));
                }
            }
            self.append(chunk, last).await?;
            self.received = end;
            if last {
                let mut reply = Shareable::make_reply(ReturnCode::OK, None);
                reply.insert(KEY_RECEIVED, self.received);
                Ok(ConsumeResult::stop(Some(reply)))
            } else {
                Ok(ConsumeResult::keep_going(None))
            }
        })
    }

    fn finalize<'a>(
        &'a mut self,
        stream_ctx: &'a StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let rc = ReturnCode::from(stream_ctx.rc().unwrap_or("OK"));
            let ok = rc.is_ok();
            let (data, path, failure) =
                match std::mem::replace(&mut self.sink, SinkState::Writer(None)) {
                    SinkState::Memory(buf) => (ok.then(|| buf.freeze()), None, None),
                    SinkState::File(path, writer) => {
                        drop(writer);
                        if ok {
                            (None, Some(path), None)
                        } else {
                            let failure = std::fs::remove_file(&path).err().map(|e| {
                                format!("could not remove the partial file {}: {e}", path.display())
                            });
                            (None, None, failure)
                        }
                    }
                    SinkState::Writer(w) => {
                        drop(w);
                        (None, None, None)
                    }
                };
            // The receiver of the channel may be gone: nobody wants the result then.
            let _ = self.done.send(ReceivedBytes {
                rc,
                stream_ctx: stream_ctx.clone(),
                size: self.received,
                data,
                path,
            });
            match failure {
                Some(text) => Err(text),
                None => Ok(()),
            }
        })
    }
}

/// The sink maker of a [`BytesConsumerFactory`]: where the bytes of a new stream go.
pub type SinkMaker = Arc<dyn Fn(&StreamContext) -> Result<ByteSink, String> + Send + Sync>;

/// Makes a [`BytesConsumer`] per incoming stream; each finished stream (whatever its end) is
/// reported as a [`ReceivedBytes`] on the channel returned by the constructor.
///
/// # Example
/// ```
/// use fedrun_engine::stream::{ByteSink, BytesConsumerFactory};
///
/// // every stream to a file named after the sender's "name" entry
/// let (factory, received) = BytesConsumerFactory::new(|stream_ctx| {
///     let name = stream_ctx.get("name").and_then(|v| v.as_str()).ok_or("no name")?;
///     Ok(ByteSink::File(std::env::temp_dir().join(name)))
/// });
/// # let _ = (factory, received);
/// ```
pub struct BytesConsumerFactory {
    make_sink: SinkMaker,
    done: mpsc::UnboundedSender<ReceivedBytes>,
}

impl fmt::Debug for BytesConsumerFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BytesConsumerFactory")
    }
}

impl BytesConsumerFactory {
    /// A factory whose streams go where `make_sink` says (an error refuses the stream), and the
    /// channel on which finished streams are reported.
    pub fn new<F>(make_sink: F) -> (Self, mpsc::UnboundedReceiver<ReceivedBytes>)
    where
        F: Fn(&StreamContext) -> Result<ByteSink, String> + Send + Sync + 'static,
    {
        let (done, rx) = mpsc::unbounded_channel();
        (
            BytesConsumerFactory {
                make_sink: Arc::new(make_sink),
                done,
            },
            rx,
        )
    }

    /// A factory that reassembles every stream in memory.
    pub fn in_memory() -> (Self, mpsc::UnboundedReceiver<ReceivedBytes>) {
        Self::new(|_| Ok(ByteSink::Memory))
    }
}

impl ConsumerFactory for BytesConsumerFactory {
    fn get_consumer<'a>(
        &'a self,
        stream_ctx: &'a StreamContext,
        _ctx: &'a FlContext,
        _end: EndStream,
    ) -> BoxFuture<'a, Result<Box<dyn ObjectConsumer>, String>> {
        Box::pin(async move {
            let size = stream_ctx.get(CTX_SIZE).and_then(Value::as_u64);
            let sink = match (self.make_sink)(stream_ctx)? {
                ByteSink::Memory => {
                    // Never trust a peer's size for an up-front allocation beyond one chunk.
                    let hint = size.unwrap_or(0).min(DEFAULT_CHUNK_SIZE as u64) as usize;
                    SinkState::Memory(BytesMut::with_capacity(hint))
                }
                ByteSink::File(path) => {
                    let file = File::create(&path)
                        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                    SinkState::File(path, Some(BufWriter::new(file)))
                }
                ByteSink::Writer(w) => SinkState::Writer(Some(w)),
            };
            Ok(Box::new(BytesConsumer {
                sink,
                received: 0,
                size,
                done: self.done.clone(),
            }) as Box<dyn ObjectConsumer>)
        })
    }
}
