//! The LOBS container: the main msgpack body followed by datum sections.
//!
//! `fobs.dumps` output is a sequence of sections, each a 10-byte header
//! (`marker u8, dot u8, size u64` big-endian) and `size` bytes of body:
//!
//! | marker | section | body |
//! |---|---|---|
//! | 100 | main (always first, dot 0) | msgpack of the object tree |
//! | 101 | TEXT datum | 16-byte UUID + UTF-8 text |
//! | 102 | BLOB datum | 16-byte UUID + raw bytes |
//! | 103 | FILE datum | 16-byte UUID + file contents |
//!
//! Large `bytes`/`str` values are moved out of the main body into datums so that the msgpack
//! body stays small; a datum whose `dot` (datum object type) is not 0 is a post-processing
//! instruction (3 = numpy download reference, 6 = tensor download reference). This module splits
//! and writes sections; resolving the references is [`crate::tags`]'s job.

use bytes::Bytes;
use uuid::Uuid;

use crate::error::FobsError;

/// Marker of the main section.
pub const MARKER_MAIN: u8 = 100;
/// Marker of a TEXT datum section.
pub const MARKER_TEXT: u8 = 101;
/// Marker of a BLOB datum section.
pub const MARKER_BLOB: u8 = 102;
/// Marker of a FILE datum section.
pub const MARKER_FILE: u8 = 103;
/// Length of a section header.
pub const SECTION_HEADER_LEN: usize = 10;
/// Length of the binary UUID that starts every datum body.
pub const DATUM_ID_LEN: usize = 16;

/// The kind of a datum section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatumKind {
    /// UTF-8 text (marker 101).
    Text,
    /// Raw bytes (marker 102).
    Blob,
    /// A file's contents (marker 103).
    File,
}

impl DatumKind {
    /// The section marker.
    pub fn marker(self) -> u8 {
        match self {
            DatumKind::Text => MARKER_TEXT,
            DatumKind::Blob => MARKER_BLOB,
            DatumKind::File => MARKER_FILE,
        }
    }

    /// The kind for a datum section marker.
    pub fn from_marker(marker: u8) -> Option<DatumKind> {
        match marker {
            MARKER_TEXT => Some(DatumKind::Text),
            MARKER_BLOB => Some(DatumKind::Blob),
            MARKER_FILE => Some(DatumKind::File),
            _ => None,
        }
    }
}

/// One datum section.
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use fedrun_fobs::lobs::{Datum, DatumKind};
/// use uuid::Uuid;
///
/// let d = Datum { kind: DatumKind::Blob, dot: 0, id: Uuid::nil(), content: Bytes::from_static(b"abc") };
/// assert_eq!(d.section_len(), 10 + 16 + 3);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datum {
    /// TEXT, BLOB or FILE.
    pub kind: DatumKind,
    /// The datum object type (0 = plain value; 3 = numpy download ref; 6 = tensor download ref).
    pub dot: u8,
    /// The datum id.
    pub id: Uuid,
    /// The body after the id (a zero-copy slice of the payload when decoded).
    pub content: Bytes,
}

impl Datum {
    /// The number of bytes this datum takes in a container, header included.
    pub fn section_len(&self) -> usize {
        SECTION_HEADER_LEN + DATUM_ID_LEN + self.content.len()
    }
}

/// A container split into its main body and its datums (zero-copy).
#[derive(Clone, Debug, PartialEq)]
pub struct Sections {
    /// The msgpack main body.
    pub main: Bytes,
    /// The datum sections, in order.
    pub datums: Vec<Datum>,
}

/// Split a LOBS container into sections, checking every header against the input: the first
/// section must be the main one (dot 0), there must be exactly one, sizes must fit, datum ids
/// must be unique and TEXT datums must be UTF-8.
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use fedrun_fobs::{lobs, FobsError};
///
/// let s = lobs::split(&Bytes::from_static(b"\x64\x00\x00\x00\x00\x00\x00\x00\x00\x01\xc0")).unwrap();
/// assert_eq!(&s.main[..], b"\xc0");
/// assert!(s.datums.is_empty());
///
/// let past_end = Bytes::from_static(b"\x64\x00\x00\x00\x00\x00\x00\x00\x00\x09\xc0");
/// assert!(matches!(lobs::split(&past_end), Err(FobsError::SectionPastEnd { .. })));
/// ```
pub fn split(input: &Bytes) -> Result<Sections, FobsError> {
    let mut pos = 0;
    let mut main: Option<Bytes> = None;
    let mut datums: Vec<Datum> = Vec::new();
    let mut ids = std::collections::HashSet::new();
    while pos < input.len() {
        let start = pos;
        let remaining = input.len() - pos;
        if remaining < SECTION_HEADER_LEN {
            return Err(FobsError::SectionHeaderTruncated {
                offset: start,
                remaining,
            });
        }
        let marker = input[pos];
        let dot = input[pos + 1];
        let mut size_be = [0u8; 8];
        size_be.copy_from_slice(&input[pos + 2..pos + SECTION_HEADER_LEN]);
        let size = u64::from_be_bytes(size_be);
        pos += SECTION_HEADER_LEN;
        let left = input.len() - pos;
        let len = match usize::try_from(size) {
            Ok(n) if n <= left => n,
            _ => {
                return Err(FobsError::SectionPastEnd {
                    offset: start,
                    size,
                    remaining: left,
                })
            }
        };
        let body = input.slice(pos..pos + len);
        pos += len;
        if marker == MARKER_MAIN {
            if main.is_some() {
                return Err(FobsError::DuplicateMain { offset: start });
            }
            if dot != 0 {
                return Err(FobsError::MainWithDot { dot });
            }
            main = Some(body);
            continue;
        }
        let Some(kind) = DatumKind::from_marker(marker) else {
            return Err(FobsError::BadSectionMarker {
                offset: start,
                marker,
            });
        };
        if main.is_none() {
            return Err(FobsError::MainNotFirst { marker });
        }
        if len < DATUM_ID_LEN {
            return Err(FobsError::DatumTooShort {
                offset: start,
                size,
            });
        }
        let mut id_bytes = [0u8; DATUM_ID_LEN];
        id_bytes.copy_from_slice(&body[..DATUM_ID_LEN]);
        let id = Uuid::from_bytes(id_bytes);
        if !ids.insert(id) {
            return Err(FobsError::DuplicateDatumId(id));
        }
        let content = body.slice(DATUM_ID_LEN..);
        if kind == DatumKind::Text && std::str::from_utf8(&content).is_err() {
            return Err(FobsError::InvalidUtf8 {
                offset: start + SECTION_HEADER_LEN + DATUM_ID_LEN,
            });
        }
        datums.push(Datum {
            kind,
            dot,
            id,
            content,
        });
    }
    let main = main.ok_or(FobsError::MissingMain)?;
    Ok(Sections { main, datums })
}

/// Append a section header.
pub fn write_section_header(out: &mut Vec<u8>, marker: u8, dot: u8, size: u64) {
    out.push(marker);
    out.push(dot);
    out.extend_from_slice(&size.to_be_bytes());
}

/// Append a datum section whose content is `content`.
pub(crate) fn write_datum_section(
    out: &mut Vec<u8>,
    kind: DatumKind,
    dot: u8,
    id: &Uuid,
    content: &[u8],
) {
    write_section_header(
        out,
        kind.marker(),
        dot,
        (DATUM_ID_LEN + content.len()) as u64,
    );
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(content);
}

/// Append a datum section.
pub fn write_datum(out: &mut Vec<u8>, datum: &Datum) {
    write_datum_section(out, datum.kind, datum.dot, &datum.id, &datum.content);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn section(marker: u8, dot: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_section_header(&mut v, marker, dot, body.len() as u64);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn main_must_come_first_and_only_once() {
        let mut datum_body = vec![1u8; 16];
        datum_body.push(b'x');
        let datum_first = [section(102, 0, &datum_body), section(100, 0, b"\xc0")].concat();
        assert_eq!(
            split(&Bytes::from(datum_first)),
            Err(FobsError::MainNotFirst { marker: 102 })
        );
        let twice = [section(100, 0, b"\xc0"), section(100, 0, b"\xc0")].concat();
        assert_eq!(
            split(&Bytes::from(twice)),
            Err(FobsError::DuplicateMain { offset: 11 })
        );
        assert_eq!(split(&Bytes::new()), Err(FobsError::MissingMain));
    }

    #[test]
    fn bad_markers_short_datums_and_duplicate_ids_are_typed_errors() {
        let bad = [section(100, 0, b"\xc0"), section(7, 0, b"")].concat();
        assert!(matches!(
            split(&Bytes::from(bad)),
            Err(FobsError::BadSectionMarker { marker: 7, .. })
        ));
        let short = [section(100, 0, b"\xc0"), section(102, 0, &[0u8; 15])].concat();
        assert!(matches!(
            split(&Bytes::from(short)),
            Err(FobsError::DatumTooShort { .. })
        ));
        let d = [0u8; 17];
        let dup = [
            section(100, 0, b"\xc0"),
            section(102, 0, &d),
            section(102, 0, &d),
        ]
        .concat();
        assert!(matches!(
            split(&Bytes::from(dup)),
            Err(FobsError::DuplicateDatumId(_))
        ));
        let mut text = vec![0u8; 16];
        text.push(0xff);
        let bad_text = [section(100, 0, b"\xc0"), section(101, 3, &text)].concat();
        assert!(matches!(
            split(&Bytes::from(bad_text)),
            Err(FobsError::InvalidUtf8 { .. })
        ));
    }

    #[test]
    fn size_past_end_is_a_typed_error_even_for_huge_sizes() {
        let mut v = Vec::new();
        write_section_header(&mut v, 100, 0, u64::MAX);
        assert!(matches!(
            split(&Bytes::from(v)),
            Err(FobsError::SectionPastEnd { .. })
        ));
        assert!(matches!(
            split(&Bytes::from_static(b"\x64\x00\x00")),
            Err(FobsError::SectionHeaderTruncated { .. })
        ));
    }

    #[test]
    fn datums_are_slices_of_the_input() {
        let mut body = Uuid::from_u128(7).as_bytes().to_vec();
        body.extend_from_slice(b"payload");
        let input = Bytes::from([section(100, 0, b"\xc0"), section(102, 0, &body)].concat());
        let s = split(&input).unwrap();
        assert_eq!(s.datums.len(), 1);
        assert_eq!(s.datums[0].id, Uuid::from_u128(7));
        assert_eq!(&s.datums[0].content[..], b"payload");
        assert_eq!(
            s.datums[0].content.as_ptr(),
            input[input.len() - 7..].as_ptr()
        );
        let mut out = Vec::new();
        out.extend_from_slice(&input[..11]);
        write_datum(&mut out, &s.datums[0]);
        assert_eq!(out, input);
    }
}
