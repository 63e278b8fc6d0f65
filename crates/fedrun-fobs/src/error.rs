//! The one error type of the codec.
//!
//! Every way a peer's bytes can be wrong has its own variant with the byte offset where it was
//! found, so that a bad payload is reported precisely and never turns into a panic.

use uuid::Uuid;

/// What can go wrong when decoding or encoding a payload.
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use fedrun_fobs::{msgpack, FobsError};
///
/// // a str8 that claims 5 bytes but carries 2
/// let err = msgpack::decode(Bytes::from_static(b"\xd9\x05ab")).unwrap_err();
/// assert!(matches!(err, FobsError::LengthPastEnd { .. }));
/// ```
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum FobsError {
    /// The input ended inside a msgpack value.
    #[error("truncated input at byte {offset}: need {needed} more bytes, {available} left")]
    Truncated {
        /// Where the value being read starts or continues.
        offset: usize,
        /// How many bytes were needed.
        needed: usize,
        /// How many were left.
        available: usize,
    },
    /// A length or element count points past the end of the input.
    #[error(
        "length {claimed} at byte {offset} goes past the end of the input ({remaining} bytes left)"
    )]
    LengthPastEnd {
        /// Where the length was read.
        offset: usize,
        /// The length (bytes, or elements for arrays and maps) it claims.
        claimed: u64,
        /// How many bytes were left.
        remaining: usize,
    },
    /// Containers are nested deeper than the decoder's limit.
    #[error("nesting deeper than {limit} levels at byte {offset}")]
    DepthExceeded {
        /// The limit.
        limit: usize,
        /// Where the container that went too deep starts.
        offset: usize,
    },
    /// The input holds more msgpack values than the decoder's limit (see
    /// [`crate::msgpack::DEFAULT_MAX_VALUES`]), or a container declares more.
    #[error("more than {limit} msgpack values, at byte {offset}")]
    TooManyValues {
        /// The limit.
        limit: usize,
        /// Where the value or the container header that passed it starts.
        offset: usize,
    },
    /// Datum references ask for more TEXT datum copies than the payload's TEXT datums hold
    /// (each resolved TEXT datum becomes a `str` of its own; refused beyond the payload's size).
    #[error("datum references copy {copied} bytes of TEXT datums, more than the {held} bytes the payload's TEXT datums hold")]
    DatumTextReused {
        /// The bytes the references would copy, this one included.
        copied: usize,
        /// The bytes of all TEXT datums of the payload.
        held: usize,
    },
    /// A msgpack str (or a TEXT datum) is not valid UTF-8.
    #[error("invalid UTF-8 in the string at byte {offset}")]
    InvalidUtf8 {
        /// Where the string starts.
        offset: usize,
    },
    /// The byte `0xc1`, which msgpack reserves and never uses.
    #[error("reserved msgpack marker 0xc1 at byte {offset}")]
    ReservedMarker {
        /// Where it was found.
        offset: usize,
    },
    /// Bytes are left after the value that should fill the input.
    #[error("{remaining} unexpected bytes after the value, at byte {offset}")]
    TrailingBytes {
        /// Where the extra bytes start.
        offset: usize,
        /// How many there are.
        remaining: usize,
    },
    /// The plain msgpack writer was given a FOBS object (tuple, ndarray, ...); use the FOBS
    /// encoder ([`crate::encode_value`]) for those.
    #[error("a {0} is not a msgpack-native value; encode it with the FOBS encoder")]
    NotMsgpackNative(&'static str),
    /// A value is too large for msgpack (more than `u32::MAX` bytes or elements).
    #[error("a {what} of {len} bytes or elements is too large for msgpack")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// Values are nested deeper than the encoder's limit.
    #[error("value nested deeper than {limit} levels cannot be encoded")]
    EncodeDepthExceeded {
        /// The limit.
        limit: usize,
    },
    /// A LOBS section header is cut short.
    #[error("truncated LOBS section header at byte {offset}: {remaining} of 10 bytes")]
    SectionHeaderTruncated {
        /// Where the section starts.
        offset: usize,
        /// How many header bytes there are.
        remaining: usize,
    },
    /// A LOBS section has an unknown marker.
    #[error("unknown LOBS section marker {marker} at byte {offset}")]
    BadSectionMarker {
        /// Where the section starts.
        offset: usize,
        /// The marker found.
        marker: u8,
    },
    /// A LOBS section's size goes past the end of the input.
    #[error("LOBS section at byte {offset} claims {size} bytes but only {remaining} remain")]
    SectionPastEnd {
        /// Where the section starts.
        offset: usize,
        /// The size it claims.
        size: u64,
        /// How many bytes remain after its header.
        remaining: usize,
    },
    /// The input has no main section at all (it is empty).
    #[error("LOBS payload has no main section")]
    MissingMain,
    /// The first section is not the main section.
    #[error("LOBS payload must start with the main section (marker 100), found marker {marker}")]
    MainNotFirst {
        /// The marker of the first section.
        marker: u8,
    },
    /// A second main section.
    #[error("second LOBS main section at byte {offset}")]
    DuplicateMain {
        /// Where it starts.
        offset: usize,
    },
    /// The main section has a non-zero datum object type.
    #[error("LOBS main section has dot {dot}; it must be 0")]
    MainWithDot {
        /// The dot found.
        dot: u8,
    },
    /// A datum section is too short to hold its 16-byte id.
    #[error("datum section at byte {offset} has {size} bytes, fewer than its 16-byte id")]
    DatumTooShort {
        /// Where the section starts.
        offset: usize,
        /// Its size.
        size: u64,
    },
    /// Two datum sections carry the same id.
    #[error("two datum sections carry the id {0}")]
    DuplicateDatumId(Uuid),
    /// A datum reference names no datum section of the payload.
    #[error("datum reference {0:?} names no datum of the payload")]
    UnknownDatumId(String),
    /// An encode option is out of range.
    #[error("invalid encode option: {0}")]
    InvalidOption(&'static str),
    /// Datum ids to reuse were given, but fewer than the datums the value needs.
    #[error("{given} datum ids were given to reuse but the value needs at least {needed}")]
    NotEnoughDatumIds {
        /// How many the value needs (at least).
        needed: usize,
        /// How many were given.
        given: usize,
    },
}
