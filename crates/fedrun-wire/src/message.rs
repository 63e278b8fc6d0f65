//! Cell messages on the wire: a [`CellMessage`] ↔ one DATA frame.
//!
//! An SFM DATA frame carries exactly one CellNet message: the frame's header map *is* the
//! message's header map and the frame's payload is the message payload encoded per
//! `cn__payload_encoding` (`none`: empty, `bytes`: raw, `fobs`: a LOBS container). Inside one
//! process fedrun never encodes payloads; this module is where the TCP transport does, in one
//! place, following NVFlare's rules in both directions.
//!
//! NVFlare's numpy download references travel as TEXT datums (dot 3) appended to the LOBS
//! payload. fedrun keeps them out of the payload value, in the local-only header
//! [`header::DOWNLOAD_REFS`]: set on a decoded message (so that the receiving cell resolves the
//! refs before dispatching), turned back into datums (and removed) on an encoded one. A relayed
//! message is never decoded, so its datums pass through untouched.

use std::sync::Arc;

use bytes::Bytes;
use fedrun_cell::{header, CellMessage, Headers, Payload, PayloadEncoding};
use fedrun_core::Value;
use fedrun_fobs::download_ref::{self, DownloadRef, DOT_NUMPY_DOWNLOAD, DOT_TENSOR_DOWNLOAD};
use fedrun_fobs::lobs::Datum;

use crate::body::Body;
use crate::error::WireError;
use crate::frame::{Frame, FrameType};

/// Encodes a payload as NVFlare's sender does: absent (or `nil`) → `none` with no bytes,
/// bytes-like → `bytes` as they are, anything else → `fobs` (a LOBS container).
///
/// # Errors
///
/// [`WireError::PayloadEncode`] when the value cannot be FOBS-encoded.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use fedrun_cell::{Payload, PayloadEncoding};
/// use fedrun_wire::encode_payload;
///
/// let (enc, body) = encode_payload(&Payload::value("hello")).unwrap();
/// assert_eq!(enc, PayloadEncoding::Fobs);
/// assert_eq!(&body[..], b"\x64\x00\x00\x00\x00\x00\x00\x00\x00\x06\xa5hello");
/// assert_eq!(encode_payload(&Payload::None).unwrap(), (PayloadEncoding::None, Bytes::new()));
/// ```
pub fn encode_payload(payload: &Payload) -> Result<(PayloadEncoding, Bytes), WireError> {
    encode_payload_with(payload, &[])
}

/// [`encode_payload`] with download-reference datums appended to a FOBS payload.
pub(crate) fn encode_payload_with(
    payload: &Payload,
    extra: &[Datum],
) -> Result<(PayloadEncoding, Bytes), WireError> {
    if !extra.is_empty() {
        let (encoding, body) = encode_payload_body_with(payload, extra)?;
        return Ok((encoding, body.to_bytes()));
    }
    Ok(match payload {
        Payload::None => (PayloadEncoding::None, Bytes::new()),
        Payload::Bytes(b) => (PayloadEncoding::Bytes, b.clone()),
        Payload::Value(v) => match v.as_ref() {
            Value::Nil => (PayloadEncoding::None, Bytes::new()),
            Value::Bin(b) => (PayloadEncoding::Bytes, b.clone()),
            other => (
                PayloadEncoding::Fobs,
                fedrun_fobs::encode(other).map_err(WireError::PayloadEncode)?,
            ),
        },
    })
}

/// [`encode_payload`] as a [`Body`]: the same bytes, but a big `bytes` value inside a FOBS
/// payload is referenced as a segment of its own instead of being copied
/// ([`fedrun_fobs::encode_segments`]).
///
/// `extra` are download-reference datums (see [`ref_datums`]) appended to a FOBS payload; a
/// payload that is not a FOBS value cannot carry them ([`WireError::RefsWithoutObject`]).
pub(crate) fn encode_payload_body_with(
    payload: &Payload,
    extra: &[Datum],
) -> Result<(PayloadEncoding, Body), WireError> {
    Ok(match payload {
        Payload::Value(v) if !matches!(v.as_ref(), Value::Nil | Value::Bin(_)) => (
            PayloadEncoding::Fobs,
            Body::from_segments(
                fedrun_fobs::encode_segments_with_extra(
                    v,
                    extra,
                    &fedrun_fobs::EncodeOptions::default(),
                )
                .map_err(WireError::PayloadEncode)?,
            ),
        ),
        _ if !extra.is_empty() => return Err(WireError::RefsWithoutObject),
        other => {
            let (encoding, bytes) = encode_payload(other)?;
            (encoding, Body::from(bytes))
        }
    })
}

/// Decodes a frame payload per its `cn__payload_encoding` value, as NVFlare's receiver does:
/// `fobs` → the decoded value, `none` → no payload, `bytes` → the bytes; a missing or unknown
/// encoding hands the bytes over raw. Bytes are never copied.
///
/// Download references (arrays to be pulled from their producer) cannot be passed on by this
/// function, which returns only the payload; [`message_from_frame`] puts them in the local
/// [`header::DOWNLOAD_REFS`] for the receiving cell to resolve. Here a warning says how many
/// were left.
///
/// # Errors
///
/// [`WireError::PayloadDecode`] when a `fobs` payload does not decode.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use fedrun_cell::Payload;
/// use fedrun_wire::decode_payload;
///
/// let p = decode_payload(Some("fobs"), Bytes::from_static(b"\x64\x00\x00\x00\x00\x00\x00\x00\x00\x01\x07")).unwrap();
/// assert_eq!(p.as_value().and_then(|v| v.as_i64()), Some(7));
/// assert_eq!(decode_payload(Some("none"), Bytes::new()).unwrap(), Payload::None);
/// assert!(decode_payload(Some("fobs"), Bytes::from_static(b"junk")).is_err());
/// ```
pub fn decode_payload(encoding: Option<&str>, body: Bytes) -> Result<Payload, WireError> {
    let (payload, refs) = decode_payload_with_refs(encoding, body)?;
    if !refs.is_empty() {
        log::warn!(
            "fobs payload carries {} download reference(s) that decode_payload cannot pass on; \
             the arrays stay unresolved placeholders (use message_from_frame)",
            refs.len()
        );
    }
    Ok(payload)
}

/// [`decode_payload`], also returning the payload's download references (datums with dot 3 or
/// 6): the caller puts them in the message's [`header::DOWNLOAD_REFS`] so that the receiving
/// cell resolves them. Other datum sections that FOBS cannot resolve in place are logged and
/// left. A malformed download-reference datum is a decode error: the payload would otherwise
/// reach its handler with placeholders nobody can resolve.
///
/// # Errors
///
/// [`WireError::PayloadDecode`] when a `fobs` payload does not decode;
/// [`WireError::BadDownloadRef`] for a malformed download-reference datum.
pub fn decode_payload_with_refs(
    encoding: Option<&str>,
    body: Bytes,
) -> Result<(Payload, Vec<DownloadRef>), WireError> {
    match encoding.and_then(PayloadEncoding::from_wire) {
        Some(PayloadEncoding::Fobs) => {
            let decoded = fedrun_fobs::decode(body).map_err(|source| WireError::PayloadDecode {
                encoding: "fobs",
                source,
            })?;
            let mut refs = Vec::new();
            let mut others = 0usize;
            for d in &decoded.extra_datums {
                if d.dot == DOT_NUMPY_DOWNLOAD || d.dot == DOT_TENSOR_DOWNLOAD {
                    refs.push(DownloadRef::from_datum(d).map_err(WireError::BadDownloadRef)?);
                } else {
                    others += 1;
                }
            }
            if others > 0 {
                log::warn!(
                    "fobs payload carries {others} datum section(s) that are not resolved in place"
                );
            }
            Ok((Payload::Value(Arc::new(decoded.value)), refs))
        }
        other => Ok((decode_plain(other, encoding, body), Vec::new())),
    }
}

/// The non-FOBS encodings.
fn decode_plain(known: Option<PayloadEncoding>, encoding: Option<&str>, body: Bytes) -> Payload {
    match known {
        // (`fobs` is decoded by the caller and never comes here)
        Some(PayloadEncoding::Bytes | PayloadEncoding::Fobs) => Payload::Bytes(body),
        Some(PayloadEncoding::None) => Payload::None,
        None => {
            if let Some(other) = encoding {
                log::debug!("unknown payload encoding {other:?}: payload handed over as bytes");
            }
            Payload::Bytes(body)
        }
    }
}

/// The download-reference datums an outgoing message's local [`header::DOWNLOAD_REFS`] asks
/// for (empty without the header). The header itself must not be written to the wire: callers
/// remove it ([`Headers::remove`]) or skip it when copying headers.
///
/// # Errors
///
/// [`WireError::BadDownloadRef`] when the header is not a list of `{fqcn, ref_id, dot}`.
pub(crate) fn ref_datums(headers: &Headers) -> Result<Vec<Datum>, WireError> {
    match headers.get(header::DOWNLOAD_REFS) {
        None => Ok(Vec::new()),
        Some(v) => Ok(download_ref::refs_from_value(v)
            .map_err(WireError::BadDownloadRef)?
            .iter()
            .map(DownloadRef::to_datum)
            .collect()),
    }
}

/// Removes the local header from `headers` and returns the datums it asks for.
pub(crate) fn take_ref_datums(headers: &mut Headers) -> Result<Vec<Datum>, WireError> {
    let datums = ref_datums(headers)?;
    headers.remove(header::DOWNLOAD_REFS);
    Ok(datums)
}

/// The DATA frame carrying `msg`: its headers plus `cn__payload_encoding` and
/// `cn__payload_len` for the encoded payload. Prefix counters (stream id, sequence) are left at
/// 0 for the connection's writer to set.
///
/// # Errors
///
/// [`WireError::PayloadEncode`] when the payload cannot be FOBS-encoded.
///
/// # Example
///
/// ```
/// use fedrun_cell::{CellMessage, header};
/// use fedrun_core::Shareable;
/// use fedrun_wire::{frame_from_message, message_from_frame};
///
/// let msg = CellMessage::new(Shareable::new()).with_header(header::CHANNEL, "task");
/// let frame = frame_from_message(msg.clone()).unwrap();
/// let h = frame.headers.as_ref().unwrap();
/// assert_eq!(h.get(header::PAYLOAD_ENCODING).and_then(|v| v.as_str()), Some("fobs"));
/// assert_eq!(h.payload_len(), Some(frame.payload.len() as u64));
///
/// let back = message_from_frame(frame).unwrap();
/// assert_eq!(back.payload, msg.payload);
/// assert!(back.headers.get(header::PAYLOAD_ENCODING).is_none());
/// ```
pub fn frame_from_message(msg: CellMessage) -> Result<Frame, WireError> {
    let CellMessage {
        mut headers,
        payload,
    } = msg;
    let refs = take_ref_datums(&mut headers)?;
    let (encoding, body) = encode_payload_with(&payload, &refs)?;
    headers.set_payload_encoding(encoding);
    headers.set_payload_len(body.len() as u64);
    Ok(Frame::data(headers, body))
}

/// The cell message a DATA frame carries: its headers (without `cn__payload_encoding`, which
/// is consumed by decoding, as NVFlare does) and its decoded payload.
///
/// # Errors
///
/// [`WireError::UnexpectedFrame`] for a frame that is not DATA,
/// [`WireError::PayloadDecode`] for a payload that does not decode.
pub fn message_from_frame(frame: Frame) -> Result<CellMessage, WireError> {
    if frame.frame_type != FrameType::Data {
        return Err(WireError::UnexpectedFrame {
            expected: "DATA",
            got: frame.frame_type.name(),
        });
    }
    let mut headers = frame.headers.unwrap_or_default();
    // a peer cannot set the local header: only what the payload itself carries counts
    headers.remove(header::DOWNLOAD_REFS);
    let encoding = headers.remove(header::PAYLOAD_ENCODING);
    let (payload, refs) =
        decode_payload_with_refs(encoding.as_ref().and_then(Value::as_str), frame.payload)?;
    if !refs.is_empty() {
        headers.insert(header::DOWNLOAD_REFS, download_ref::refs_to_value(&refs));
    }
    Ok(CellMessage { headers, payload })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fedrun_core::Shareable;

    #[test]
    fn every_payload_kind_round_trips_through_a_frame() {
        let mut s = Shareable::new();
        s.insert("x", 1);
        for payload in [
            Payload::None,
            Payload::Bytes(Bytes::from_static(b"raw")),
            Payload::shareable(s),
            Payload::value(Value::Array(vec![Value::from(1), Value::from("a")])),
        ] {
            let msg = CellMessage::new(payload.clone());
            let frame = frame_from_message(msg).unwrap();
            let bytes = frame.encode().unwrap();
            let back = message_from_frame(Frame::decode(bytes).unwrap()).unwrap();
            assert_eq!(back.payload, payload);
        }
    }

    #[test]
    fn nil_and_bin_values_travel_as_none_and_bytes() {
        let (e, b) = encode_payload(&Payload::value(Value::Nil)).unwrap();
        assert_eq!((e, b.len()), (PayloadEncoding::None, 0));
        let (e, b) = encode_payload(&Payload::value(Bytes::from_static(b"ab"))).unwrap();
        assert_eq!((e, &b[..]), (PayloadEncoding::Bytes, &b"ab"[..]));
    }

    #[test]
    fn missing_or_unknown_encoding_hands_bytes_over_raw() {
        let body = Bytes::from_static(b"\x01\x02");
        assert_eq!(
            decode_payload(None, body.clone()).unwrap(),
            Payload::Bytes(body.clone())
        );
        assert_eq!(
            decode_payload(Some("zip"), body.clone()).unwrap(),
            Payload::Bytes(body)
        );
    }

    fn numpy_ref() -> DownloadRef {
        DownloadRef {
            fqcn: "site-1.J".into(),
            ref_id: "r-1".into(),
            dot: DOT_NUMPY_DOWNLOAD,
        }
    }

    #[test]
    fn download_refs_travel_as_datums_and_come_back_as_the_local_header() {
        let mut s = Shareable::new();
        s.insert("w", download_ref::array_ref(0));
        let msg = CellMessage::new(s).with_header(
            header::DOWNLOAD_REFS,
            download_ref::refs_to_value(&[numpy_ref()]),
        );
        let frame = frame_from_message(msg).unwrap();
        let h = frame.headers.as_ref().unwrap();
        assert!(
            !h.contains_key(header::DOWNLOAD_REFS),
            "local header on the wire"
        );
        let p = fedrun_fobs::decode(frame.payload.clone()).unwrap();
        assert_eq!(p.extra_datums.len(), 1);
        assert_eq!(p.extra_datums[0].dot, DOT_NUMPY_DOWNLOAD);
        let back = message_from_frame(Frame::decode(frame.encode().unwrap()).unwrap()).unwrap();
        let refs = back.headers.get(header::DOWNLOAD_REFS).unwrap();
        assert_eq!(
            download_ref::refs_from_value(refs).unwrap(),
            vec![numpy_ref()]
        );
    }

    #[test]
    fn a_peer_cannot_set_the_local_download_refs_header() {
        let mut h = Headers::new();
        h.insert(
            header::DOWNLOAD_REFS,
            download_ref::refs_to_value(&[numpy_ref()]),
        );
        let frame = Frame::data(h, Bytes::new());
        let back = message_from_frame(frame).unwrap();
        assert!(!back.headers.contains_key(header::DOWNLOAD_REFS));
    }

    #[test]
    fn refs_without_an_object_payload_are_an_encode_error() {
        let msg = CellMessage::new(Payload::Bytes(Bytes::from_static(b"raw"))).with_header(
            header::DOWNLOAD_REFS,
            download_ref::refs_to_value(&[numpy_ref()]),
        );
        assert!(matches!(
            frame_from_message(msg),
            Err(WireError::RefsWithoutObject)
        ));
    }

    #[test]
    fn tensor_refs_are_kept_with_their_dot_for_the_resolver_to_refuse() {
        let mut r = numpy_ref();
        r.dot = DOT_TENSOR_DOWNLOAD;
        let body = fedrun_fobs::encode_segments_with_extra(
            &Value::from(1),
            &[r.to_datum()],
            &fedrun_fobs::EncodeOptions::default(),
        )
        .unwrap()
        .concat();
        let (_, refs) = decode_payload_with_refs(Some("fobs"), Bytes::from(body)).unwrap();
        assert_eq!(refs, vec![r]);
    }

    #[test]
    fn non_data_frame_is_not_a_message() {
        assert!(matches!(
            message_from_frame(Frame::ping()),
            Err(WireError::UnexpectedFrame { .. })
        ));
    }
}
