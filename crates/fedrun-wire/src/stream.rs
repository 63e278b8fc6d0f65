//! The streaming layer's headers: what one `sm__STREAM` message says.
//!
//! NVFlare sends every message on a "stream channel" (`server_command`, `aux_communication`,
//! `download_service__` ...) as a *stream*: fire-and-forget cell messages on channel
//! `sm__STREAM` whose payload is one chunk of the encoded blob and whose `sm__*` headers say
//! which stream, where in the blob, and what the blob is. The receiver acknowledges on topic
//! `sm__ACK`. This module gives those headers a typed form ([`StreamMessage`]), checked once,
//! so that the reassembly code never reads a header it has not validated. A header of the
//! wrong type is a [`WireError::StreamHeader`], never a panic.

use fedrun_cell::{header, Headers, PayloadEncoding};
use fedrun_core::Value;

use crate::error::WireError;

/// The channel of every stream message.
pub const STREAM_CHANNEL: &str = "sm__STREAM";
/// Topic of data chunks.
pub const TOPIC_DATA: &str = "sm__DATA";
/// Topic of acknowledgements.
pub const TOPIC_ACK: &str = "sm__ACK";
/// Topic of receiver-side errors.
pub const TOPIC_ERROR: &str = "sm__ERROR";
/// The channel streamed replies travel on (topic `"<channel>:<topic>"` of the request).
pub const RETURN_ONLY_CHANNEL: &str = "return_only";

/// The `sm__*` header keys.
pub mod key {
    /// Stream id (sender-unique integer).
    pub const ID: &str = "sm__id";
    /// Data type ([`DataType`](super::DataType)).
    pub const DATA_TYPE: &str = "sm__dt";
    /// Chunk sequence.
    pub const SEQ: &str = "sm__sq";
    /// Byte offset of the chunk (in an ACK: bytes consumed).
    pub const OFFSET: &str = "sm__os";
    /// Total blob size (0 = unknown).
    pub const SIZE: &str = "sm__sz";
    /// Logical channel.
    pub const CHANNEL: &str = "sm__ch";
    /// Logical topic.
    pub const TOPIC: &str = "sm__tp";
    /// Encoding of the reassembled blob.
    pub const PAYLOAD_ENCODING: &str = "sm__pe";
    /// Stream request id (streamed requests and their replies).
    pub const REQUEST_ID: &str = "sm__ri";
    /// Reliable stream (retries, mandatory ACKs).
    pub const RELIABLE: &str = "sm__rs";
    /// Optional.
    pub const OPTIONAL: &str = "sm__op";
    /// Sender chunk size.
    pub const CHUNK_SIZE: &str = "sm__cs";
    /// Sender window size.
    pub const WINDOW_SIZE: &str = "sm__ws";
    /// Sender ACK interval (chunk 0 only).
    pub const ACK_INTERVAL: &str = "sm__ai";
    /// Retry wait in seconds (chunk 0 of reliable streams).
    pub const RETRY_WAIT: &str = "sm__rw";
    /// Retry timeout in seconds (chunk 0 of reliable streams).
    pub const RETRY_TIMEOUT: &str = "sm__rt";
    /// Error message.
    pub const ERROR_MESSAGE: &str = "sm__em";
    /// Error class name.
    pub const ERROR_TYPE: &str = "sm__et";
}

/// `sm__dt`: what a stream message carries.
///
/// # Example
///
/// ```
/// use fedrun_wire::stream::DataType;
///
/// assert_eq!(DataType::from_wire(2), Some(DataType::Final));
/// assert_eq!(DataType::Ack.as_u8(), 3);
/// assert_eq!(DataType::from_wire(9), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    /// 1: a chunk that is not the last.
    Chunk,
    /// 2: the last chunk.
    Final,
    /// 3: an acknowledgement.
    Ack,
    /// 4: resume request.
    Resume,
    /// 5: resume acknowledgement.
    ResumeAck,
    /// 6: an error.
    Error,
}

impl DataType {
    /// The wire number.
    pub fn as_u8(self) -> u8 {
        match self {
            DataType::Chunk => 1,
            DataType::Final => 2,
            DataType::Ack => 3,
            DataType::Resume => 4,
            DataType::ResumeAck => 5,
            DataType::Error => 6,
        }
    }

    /// Parses the wire number.
    pub fn from_wire(n: u64) -> Option<DataType> {
        Some(match n {
            1 => DataType::Chunk,
            2 => DataType::Final,
            3 => DataType::Ack,
            4 => DataType::Resume,
            5 => DataType::ResumeAck,
            6 => DataType::Error,
            _ => return None,
        })
    }
}

/// One data chunk (`sm__DATA`, `sm__dt` 1 or 2).
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    /// `sm__id`.
    pub stream_id: u64,
    /// Whether this is the last chunk.
    pub is_final: bool,
    /// `sm__sq`.
    pub seq: u64,
    /// `sm__os`: where the chunk goes in the blob.
    pub offset: u64,
    /// `sm__sz`: the blob size (0 = unknown).
    pub size: u64,
    /// `sm__ch`: the logical channel.
    pub channel: String,
    /// `sm__tp`: the logical topic.
    pub topic: String,
    /// `sm__pe`: the blob's encoding (absent: raw bytes).
    pub payload_encoding: Option<PayloadEncoding>,
    /// `sm__ri`: present on streamed requests and their replies.
    pub request_id: Option<String>,
    /// `sm__rs`.
    pub reliable: bool,
    /// `sm__op`.
    pub optional: bool,
    /// `sm__cs`.
    pub chunk_size: Option<u64>,
    /// `sm__ws`.
    pub window_size: Option<u64>,
    /// `sm__ai` (chunk 0 only).
    pub ack_interval: Option<u64>,
}

/// An acknowledgement (`sm__ACK`, `sm__dt` 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// `sm__id`.
    pub stream_id: u64,
    /// `sm__os`: bytes consumed so far.
    pub offset: u64,
    /// `sm__sq`: last in-order sequence (absent: the receiver does not stream reliably).
    pub seq: Option<u64>,
}

/// An error about a stream (`sm__dt` 6 on any stream topic).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamError {
    /// `sm__id`.
    pub stream_id: u64,
    /// `sm__em`.
    pub message: Option<String>,
    /// `sm__et`.
    pub error_type: Option<String>,
}

/// What one `sm__STREAM` message is, from its headers.
///
/// # Example
///
/// ```
/// use fedrun_cell::Headers;
/// use fedrun_wire::stream::{key, StreamMessage, STREAM_CHANNEL, TOPIC_ACK};
///
/// let mut h = Headers::new();
/// h.set_channel(STREAM_CHANNEL);
/// h.set_topic(TOPIC_ACK);
/// h.insert(key::ID, 1795971592304553u64);
/// h.insert(key::DATA_TYPE, 3);
/// h.insert(key::OFFSET, 88);
/// h.insert(key::SEQ, 0);
/// match StreamMessage::parse(&h).unwrap() {
///     StreamMessage::Ack(a) => assert_eq!((a.offset, a.seq), (88, Some(0))),
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum StreamMessage {
    /// A data chunk.
    Chunk(Chunk),
    /// An acknowledgement.
    Ack(Ack),
    /// An error (receiver- or sender-side).
    Error(StreamError),
    /// A resume request or answer (not used by NVFlare 2.9's byte streamer).
    Resume {
        /// `sm__id`.
        stream_id: u64,
        /// `sm__dt`: [`DataType::Resume`] or [`DataType::ResumeAck`].
        data_type: DataType,
    },
}

fn get_u64(h: &Headers, key: &'static str) -> Result<Option<u64>, WireError> {
    match h.get(key) {
        None | Some(Value::Nil) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(WireError::StreamHeader {
            key,
            problem: "not a non-negative integer",
        }),
    }
}

fn need_u64(h: &Headers, key: &'static str) -> Result<u64, WireError> {
    get_u64(h, key)?.ok_or(WireError::StreamHeader {
        key,
        problem: "missing",
    })
}

fn get_str(h: &Headers, key: &'static str) -> Result<Option<String>, WireError> {
    match h.get(key) {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Str(s)) => Ok(Some(s.clone())),
        Some(_) => Err(WireError::StreamHeader {
            key,
            problem: "not a string",
        }),
    }
}

fn need_str(h: &Headers, key: &'static str) -> Result<String, WireError> {
    get_str(h, key)?.ok_or(WireError::StreamHeader {
        key,
        problem: "missing",
    })
}

fn get_bool(h: &Headers, key: &'static str) -> Result<bool, WireError> {
    match h.get(key) {
        None | Some(Value::Nil) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(WireError::StreamHeader {
            key,
            problem: "not a bool",
        }),
    }
}

impl StreamMessage {
    /// Reads the `sm__*` headers of a message on [`STREAM_CHANNEL`].
    ///
    /// # Errors
    ///
    /// [`WireError::StreamHeader`] for a missing or mistyped header: `sm__id` and `sm__dt`
    /// always; `sm__sq`, `sm__os`, `sm__ch`, `sm__tp` for chunks; `sm__os` for ACKs; an
    /// unknown `sm__pe`; or a topic that is not a stream topic.
    pub fn parse(h: &Headers) -> Result<StreamMessage, WireError> {
        let stream_id = need_u64(h, key::ID)?;
        let dt = need_u64(h, key::DATA_TYPE)?;
        let data_type = DataType::from_wire(dt).ok_or(WireError::StreamHeader {
            key: key::DATA_TYPE,
            problem: "unknown data type",
        })?;
        if data_type == DataType::Error {
            return Ok(StreamMessage::Error(StreamError {
                stream_id,
                message: get_str(h, key::ERROR_MESSAGE)?,
                error_type: get_str(h, key::ERROR_TYPE)?,
            }));
        }
        let topic = h.topic().unwrap_or("");
        match (topic, data_type) {
            (TOPIC_DATA, DataType::Chunk | DataType::Final) => {
                let payload_encoding = match get_str(h, key::PAYLOAD_ENCODING)? {
                    None => None,
                    Some(s) => Some(PayloadEncoding::from_wire(&s).ok_or(
                        WireError::StreamHeader {
                            key: key::PAYLOAD_ENCODING,
                            problem: "unknown encoding",
                        },
                    )?),
                };
                Ok(StreamMessage::Chunk(Chunk {
                    stream_id,
                    is_final: data_type == DataType::Final,
                    seq: need_u64(h, key::SEQ)?,
                    offset: need_u64(h, key::OFFSET)?,
                    size: get_u64(h, key::SIZE)?.unwrap_or(0),
                    channel: need_str(h, key::CHANNEL)?,
                    topic: need_str(h, key::TOPIC)?,
                    payload_encoding,
                    request_id: get_str(h, key::REQUEST_ID)?,
                    reliable: get_bool(h, key::RELIABLE)?,
                    optional: get_bool(h, key::OPTIONAL)?,
                    chunk_size: get_u64(h, key::CHUNK_SIZE)?,
                    window_size: get_u64(h, key::WINDOW_SIZE)?,
                    ack_interval: get_u64(h, key::ACK_INTERVAL)?,
                }))
            }
            (TOPIC_ACK, DataType::Ack) => Ok(StreamMessage::Ack(Ack {
                stream_id,
                offset: need_u64(h, key::OFFSET)?,
                seq: get_u64(h, key::SEQ)?,
            })),
            (TOPIC_DATA | TOPIC_ACK, DataType::Resume | DataType::ResumeAck) => {
                Ok(StreamMessage::Resume {
                    stream_id,
                    data_type,
                })
            }
            _ => Err(WireError::StreamHeader {
                key: header::TOPIC,
                problem: "data type does not fit the stream topic",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chunk_headers() -> Headers {
        let mut h = Headers::new();
        h.set_channel(STREAM_CHANNEL);
        h.set_topic(TOPIC_DATA);
        h.insert(key::CHANNEL, "server_command");
        h.insert(key::TOPIC, "get_task");
        h.insert(key::SIZE, 5026);
        h.insert(key::ID, 7u64);
        h.insert(key::DATA_TYPE, 1);
        h.insert(key::SEQ, 1);
        h.insert(key::OFFSET, 2048);
        h.insert(key::PAYLOAD_ENCODING, "fobs");
        h
    }

    #[test]
    fn chunk_headers_parse_into_a_chunk() {
        let StreamMessage::Chunk(c) = StreamMessage::parse(&chunk_headers()).unwrap() else {
            panic!("not a chunk");
        };
        assert_eq!((c.stream_id, c.seq, c.offset, c.size), (7, 1, 2048, 5026));
        assert!(!c.is_final && !c.reliable);
        assert_eq!(c.payload_encoding, Some(PayloadEncoding::Fobs));
        assert_eq!(c.request_id, None);
    }

    #[test]
    fn missing_or_mistyped_stream_headers_are_typed_errors() {
        let mut h = chunk_headers();
        h.remove(key::OFFSET);
        assert!(matches!(
            StreamMessage::parse(&h),
            Err(WireError::StreamHeader {
                key: key::OFFSET,
                problem: "missing"
            })
        ));
        let mut h = chunk_headers();
        h.insert(key::SEQ, -1);
        assert!(StreamMessage::parse(&h).is_err());
        let mut h = chunk_headers();
        h.insert(key::DATA_TYPE, 9);
        assert!(StreamMessage::parse(&h).is_err());
        let mut h = chunk_headers();
        h.insert(key::PAYLOAD_ENCODING, "zip");
        assert!(StreamMessage::parse(&h).is_err());
        let mut h = chunk_headers();
        h.insert(key::DATA_TYPE, 3);
        assert!(StreamMessage::parse(&h).is_err());
    }

    #[test]
    fn error_data_type_is_an_error_on_any_topic() {
        let mut h = chunk_headers();
        h.set_topic(TOPIC_ERROR);
        h.insert(key::DATA_TYPE, 6);
        h.insert(key::ERROR_MESSAGE, "no callback");
        let StreamMessage::Error(e) = StreamMessage::parse(&h).unwrap() else {
            panic!("not an error");
        };
        assert_eq!(e.message.as_deref(), Some("no callback"));
    }
}
