//! The one error type of the wire crate.
//!
//! Everything a peer can get wrong (a frame length outside the limits, a header block that is
//! not a msgpack map with string keys, a handshake without a valid endpoint name, a payload that
//! does not decode) has its own variant, so that a bad connection is closed with a precise log
//! line and never with a panic. Local failures (a URL that cannot be parsed, a socket error) are
//! variants too.

use fedrun_cell::CellError;
use fedrun_fobs::FobsError;

/// What can go wrong on the wire.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use fedrun_wire::{Frame, WireError};
///
/// // a prefix claiming 8 bytes: shorter than the prefix itself
/// let bad = Bytes::from_static(&[0, 0, 0, 8, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
/// assert!(matches!(Frame::decode(bad), Err(WireError::FrameTooShort { length: 8 })));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The prefix's `length` is smaller than the 16-byte prefix.
    #[error("frame length {length} is smaller than the 16-byte prefix")]
    FrameTooShort {
        /// The claimed length.
        length: u64,
    },
    /// The prefix's `length` is above the maximum frame size.
    #[error("frame length {length} exceeds the maximum frame size {max}")]
    FrameTooLarge {
        /// The claimed (or computed) length.
        length: u64,
        /// The limit in force.
        max: u64,
    },
    /// The header block would extend past the end of the frame.
    #[error("header length {header_len} does not fit in a frame of {length} bytes")]
    HeaderLenPastEnd {
        /// The claimed header length.
        header_len: u16,
        /// The frame length.
        length: u64,
    },
    /// A complete frame buffer whose size differs from the prefix's `length`.
    #[error("frame length field says {claimed} bytes but the buffer holds {actual}")]
    LengthMismatch {
        /// The `length` field.
        claimed: u64,
        /// The buffer size.
        actual: u64,
    },
    /// A frame type outside 1..=7.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// The header block is not valid msgpack.
    #[error("invalid header block: {0}")]
    HeaderBlock(#[source] FobsError),
    /// The header block is valid msgpack but not a map.
    #[error("header block is a msgpack {0}, not a map")]
    HeaderNotMap(&'static str),
    /// A header key is not a string (NVFlare decodes headers with `strict_map_key`).
    #[error("header key {0} is not a string")]
    HeaderKeyNotString(String),
    /// The headers cannot be encoded (a value that is not msgpack-native, ...).
    #[error("cannot encode the headers: {0}")]
    HeaderEncode(#[source] FobsError),
    /// The encoded header block is longer than the 16-bit `header_len` field allows.
    #[error("encoded header block of {len} bytes exceeds 65535 bytes")]
    HeadersTooLarge {
        /// The encoded size.
        len: usize,
    },
    /// A HELLO/READY payload that is not a msgpack map with a string `endpoint_name`.
    #[error("invalid handshake payload: {0}")]
    Handshake(String),
    /// The handshake names an endpoint that is not a valid FQCN.
    #[error("invalid endpoint name in the handshake: {0}")]
    InvalidEndpointName(#[source] CellError),
    /// The endpoint name of a handshake breaks NVFlare's rules or the length bound (`name` is a
    /// bounded prefix of what the peer sent).
    #[error("endpoint name {name} refused: {reason}")]
    RefusedEndpointName {
        /// A bounded, quoted prefix of the name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The peer's endpoint name is this endpoint's own name.
    #[error("peer uses this endpoint's own name {0}")]
    SelfConnection(String),
    /// The peer sent something other than the expected handshake frame.
    #[error("expected a {expected} frame, got {got}")]
    UnexpectedFrame {
        /// The frame type that was expected.
        expected: &'static str,
        /// The frame type that came.
        got: &'static str,
    },
    /// No handshake within the deadline.
    #[error("no handshake within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The peer closed the connection.
    #[error("connection closed by the peer")]
    ConnectionClosed,
    /// A DATA payload that does not decode per its `cn__payload_encoding`.
    #[error("cannot decode the {encoding} payload: {source}")]
    PayloadDecode {
        /// The encoding that was tried.
        encoding: &'static str,
        /// Why it failed.
        #[source]
        source: FobsError,
    },
    /// A payload value that cannot be FOBS-encoded.
    #[error("cannot encode the payload: {0}")]
    PayloadEncode(#[source] FobsError),
    /// A download-reference datum (received) or the local download-refs header (to send) is
    /// malformed.
    #[error("bad download reference: {0}")]
    BadDownloadRef(#[source] fedrun_fobs::download_ref::RefError),
    /// An outgoing message asks for download-reference datums but its payload is not a FOBS
    /// object that could carry them.
    #[error("download references need a FOBS object payload")]
    RefsWithoutObject,
    /// A streaming (`sm__*`) header that is missing or has the wrong type.
    #[error("stream header {key}: {problem}")]
    StreamHeader {
        /// The header key.
        key: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A stream this endpoint sends got no ACK progress for too long.
    #[error(
        "stream {stream_id}: no ACK progress for {waited:?} (receiver acknowledged {acked} bytes)"
    )]
    StreamAckTimeout {
        /// `sm__id` of the stream.
        stream_id: u64,
        /// The no-progress limit that ran out.
        waited: std::time::Duration,
        /// Bytes the receiver had acknowledged.
        acked: u64,
    },
    /// The receiver ended a stream this endpoint sends with `sm__ERROR`.
    #[error("stream {stream_id} rejected by {receiver}: {message}")]
    StreamRejected {
        /// `sm__id` of the stream.
        stream_id: u64,
        /// The receiving cell (`cn__origin` of the error).
        receiver: String,
        /// `sm__em`.
        message: String,
        /// `sm__et` (an NVFlare error class name such as `BlobSizeError`), if sent.
        error_type: Option<String>,
    },
    /// A stream this endpoint sends could not go on: its connection closed or a chunk could
    /// not be written.
    #[error("stream {stream_id} interrupted: {reason}")]
    StreamInterrupted {
        /// `sm__id` of the stream.
        stream_id: u64,
        /// What happened.
        reason: &'static str,
    },
    /// A message to send has no valid `cn__destination`.
    #[error("invalid destination {0:?}")]
    InvalidDestination(String),
    /// No connection leads to the destination.
    #[error("no connection leads to {0}")]
    NoRoute(String),
    /// A URL that is not `tcp://host:port`.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Background tasks need a running tokio runtime (an actix `System` has one).
    #[error("no tokio runtime is running on this thread")]
    NoRuntime,
    /// The transport has been shut down.
    #[error("the transport is shut down")]
    ShutDown,
    /// TLS settings that cannot work (a mode without the credentials it needs, credentials
    /// rustls refuses, a connection security that is not clear, tls or mtls).
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    /// A TLS credential file that cannot be read or holds no usable PEM.
    #[error("TLS credential file {}: {reason}", path.display())]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why it is not usable.
        reason: String,
    },
    /// On an mTLS connection, the name an endpoint registers does not belong to the
    /// certificate it presented (NVFlare binds `site-1.<job>` to CN `site-1`, `server` to the
    /// server's identity).
    #[error(
        "authentication failed: endpoint {name} presented a certificate for {} but must be {expected}",
        cn.as_deref().unwrap_or("no CN")
    )]
    IdentityMismatch {
        /// The registered endpoint name.
        name: String,
        /// The CN of the presented certificate.
        cn: Option<String>,
        /// The identity the name requires.
        expected: String,
    },
    /// A socket error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A secure message was to be sent, and no credentials for secure messages are configured
    /// (`WireConfig::secure`): it is not sent at all, never in clear.
    #[error("secure message not sent: no credentials for secure messages are configured")]
    SecureUnavailable,
    /// Sealing a secure message for a cell failed.
    #[error("secure message for {peer}: {source}")]
    Secure {
        /// The cell.
        peer: String,
        /// Why.
        #[source]
        source: fedrun_secure::SecureError,
    },
    /// The certificate exchange with a cell failed.
    #[error("key exchange with {target} failed: {reason}")]
    KeyExchange {
        /// The cell asked.
        target: String,
        /// Why.
        reason: String,
    },
}
