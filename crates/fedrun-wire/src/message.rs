//! Cell messages on the wire: a [`CellMessage`] ↔ one DATA frame (wire spec §1, §8.1).
//!
//! An SFM DATA frame carries exactly one CellNet message: the frame's header map *is* the
//! message's header map and the frame's payload is the message payload encoded per
//! `cn__payload_encoding` (`none`: empty, `bytes`: raw, `fobs`: a LOBS container). Inside one
//! process fedrun never encodes payloads; this module is where the TCP transport does, in one
//! place, following NVFlare's rules in both directions.

use std::sync::Arc;

use bytes::Bytes;
use fedrun_cell::{header, CellMessage, Payload, PayloadEncoding};
use fedrun_core::Value;

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
pub(crate) fn encode_payload_body(payload: &Payload) -> Result<(PayloadEncoding, Body), WireError> {
    Ok(match payload {
        Payload::Value(v) if !matches!(v.as_ref(), Value::Nil | Value::Bin(_)) => (
            PayloadEncoding::Fobs,
            Body::from_segments(
                fedrun_fobs::encode_segments(v, &fedrun_fobs::EncodeOptions::default())
                    .map_err(WireError::PayloadEncode)?,
            ),
        ),
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
/// Datum sections that FOBS cannot resolve in place (download references to arrays that must
/// be pulled from their producer, wire spec §8.7) are not followed; a warning says how many
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
    match encoding.and_then(PayloadEncoding::from_wire) {
        Some(PayloadEncoding::Fobs) => {
            let decoded = fedrun_fobs::decode(body).map_err(|source| WireError::PayloadDecode {
                encoding: "fobs",
                source,
            })?;
            if !decoded.extra_datums.is_empty() {
                log::warn!(
                    "fobs payload carries {} datum section(s) that are not resolved in place \
                     (download references are not followed)",
                    decoded.extra_datums.len()
                );
            }
            Ok(Payload::Value(Arc::new(decoded.value)))
        }
        Some(PayloadEncoding::None) => Ok(Payload::None),
        Some(PayloadEncoding::Bytes) => Ok(Payload::Bytes(body)),
        None => {
            if let Some(other) = encoding {
                log::debug!("unknown payload encoding {other:?}: payload handed over as bytes");
            }
            Ok(Payload::Bytes(body))
        }
    }
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
    let (encoding, body) = encode_payload(&payload)?;
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
    let encoding = headers.remove(header::PAYLOAD_ENCODING);
    let payload = decode_payload(encoding.as_ref().and_then(Value::as_str), frame.payload)?;
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

    #[test]
    fn non_data_frame_is_not_a_message() {
        assert!(matches!(
            message_from_frame(Frame::ping()),
            Err(WireError::UnexpectedFrame { .. })
        ));
    }
}
