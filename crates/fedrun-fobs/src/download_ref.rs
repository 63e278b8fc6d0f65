//! Download references: the datums that tell a receiver where to pull arrays from.
//!
//! Inside a running NVFlare cell, numpy arrays (and tensors) are not embedded in a message:
//! each becomes `{"type": "ref", "data": "T<k>"}` and the payload gets one TEXT datum whose dot
//! (datum object type) is 3 for numpy, 6 for tensors, holding the JSON
//! `{"fqcn": <producer cell>, "ref_id": <uuid>}`. The receiver pulls the items from the producer
//! over the download protocol and puts them in place.
//!
//! fedrun moves such datums between the payload and a local-only cell header
//! (`fedrun.download_refs`): a list of `{"fqcn", "ref_id", "dot"}` maps. This module converts
//! between the three forms ([`DownloadRef`], the datum, the header value) and builds and
//! recognises the ref placeholders in the object tree.
//!
//! # Example
//! ```
//! use fedrun_fobs::download_ref::{DownloadRef, DOT_NUMPY_DOWNLOAD};
//!
//! let r = DownloadRef { fqcn: "server.J".into(), ref_id: "abc".into(), dot: DOT_NUMPY_DOWNLOAD };
//! let datum = r.to_datum();
//! assert_eq!(&datum.content[..], br#"{"fqcn": "server.J", "ref_id": "abc"}"#);
//! assert_eq!(DownloadRef::from_datum(&datum).unwrap(), r);
//! let header = fedrun_fobs::download_ref::refs_to_value(&[r.clone()]);
//! assert_eq!(fedrun_fobs::download_ref::refs_from_value(&header).unwrap(), vec![r]);
//! ```

use bytes::Bytes;
use fedrun_core::{Map, Tagged, Value};
use uuid::Uuid;

use crate::lobs::{Datum, DatumKind};
use crate::tags::{decomposer, type_name};

/// Datum object type of a numpy download reference.
pub const DOT_NUMPY_DOWNLOAD: u8 = 3;
/// Datum object type of a tensor download reference (not supported by fedrun).
pub const DOT_TENSOR_DOWNLOAD: u8 = 6;
/// The `"type"` of an ndarray that is a download reference.
pub const NDARRAY_REF: &str = "ref";
/// A JSON reference text longer than this is refused (real ones are under 200 bytes).
pub const MAX_REF_TEXT: usize = 4096;

/// Why a download reference is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefError {
    /// The datum is not a TEXT datum.
    #[error("download reference datum is not TEXT")]
    NotText,
    /// The text is longer than [`MAX_REF_TEXT`].
    #[error("download reference text of {0} bytes is too long")]
    TooLong(usize),
    /// The text is not the expected JSON object.
    #[error("download reference is not {{\"fqcn\": str, \"ref_id\": str}}: {0}")]
    BadJson(String),
    /// The header value is not a list of `{fqcn, ref_id, dot}` maps.
    #[error("download reference header is malformed: {0}")]
    BadHeader(&'static str),
}

/// One download reference: where (`fqcn`) to pull which batch (`ref_id`) of what kind (`dot`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DownloadRef {
    /// The producer cell.
    pub fqcn: String,
    /// The batch id the producer serves.
    pub ref_id: String,
    /// [`DOT_NUMPY_DOWNLOAD`] or [`DOT_TENSOR_DOWNLOAD`].
    pub dot: u8,
}

impl DownloadRef {
    /// The reference a datum holds.
    ///
    /// # Errors
    ///
    /// [`RefError`] when the datum is not TEXT or not `{"fqcn": str, "ref_id": str}`.
    pub fn from_datum(datum: &Datum) -> Result<DownloadRef, RefError> {
        if datum.kind != DatumKind::Text {
            return Err(RefError::NotText);
        }
        if datum.content.len() > MAX_REF_TEXT {
            return Err(RefError::TooLong(datum.content.len()));
        }
        let json: serde_json::Value =
            serde_json::from_slice(&datum.content).map_err(|e| RefError::BadJson(e.to_string()))?;
        let field = |k: &str| {
            json.get(k)
                .and_then(serde_json::Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| RefError::BadJson(format!("missing or empty {k:?}")))
        };
        Ok(DownloadRef {
            fqcn: field("fqcn")?,
            ref_id: field("ref_id")?,
            dot: datum.dot,
        })
    }

    /// The TEXT datum NVFlare's encoder writes for this reference (fresh id, the JSON text
    /// exactly as Python's `json.dumps` spells it).
    pub fn to_datum(&self) -> Datum {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let text = format!(
            "{{\"fqcn\": {}, \"ref_id\": {}}}",
            q(&self.fqcn),
            q(&self.ref_id)
        );
        Datum {
            kind: DatumKind::Text,
            dot: self.dot,
            id: Uuid::new_v4(),
            content: Bytes::from(text),
        }
    }

    /// The `{"fqcn", "ref_id", "dot"}` map of the local header.
    pub fn to_value(&self) -> Value {
        let mut m = Map::with_capacity(3);
        m.insert("fqcn", self.fqcn.as_str());
        m.insert("ref_id", self.ref_id.as_str());
        m.insert("dot", u64::from(self.dot));
        Value::Map(m)
    }
}

/// The local header value for `refs`.
pub fn refs_to_value(refs: &[DownloadRef]) -> Value {
    Value::Array(refs.iter().map(DownloadRef::to_value).collect())
}

/// The references of a local header value.
///
/// # Errors
///
/// [`RefError::BadHeader`] when it is not a list of `{fqcn: str, ref_id: str, dot: int}`.
pub fn refs_from_value(v: &Value) -> Result<Vec<DownloadRef>, RefError> {
    let list = v.as_array().ok_or(RefError::BadHeader("not a list"))?;
    list.iter()
        .map(|item| {
            let m = item
                .as_map()
                .ok_or(RefError::BadHeader("item is not a map"))?;
            let s = |k: &str| {
                m.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or(RefError::BadHeader("fqcn or ref_id missing"))
            };
            let dot = m
                .get("dot")
                .and_then(Value::as_u64)
                .and_then(|d| u8::try_from(d).ok())
                .ok_or(RefError::BadHeader("dot missing"))?;
            Ok(DownloadRef {
                fqcn: s("fqcn")?,
                ref_id: s("ref_id")?,
                dot,
            })
        })
        .collect()
}

/// The placeholder an ndarray becomes in a payload that refers to it: item `T<index>`.
///
/// # Example
/// ```
/// use fedrun_fobs::download_ref::{array_ref, array_ref_item};
/// assert_eq!(array_ref_item(&array_ref(4)), Some("T4"));
/// ```
pub fn array_ref(index: usize) -> Value {
    let mut data = Map::with_capacity(2);
    data.insert("type", NDARRAY_REF);
    data.insert("data", format!("T{index}"));
    Value::Tagged(Box::new(Tagged {
        type_name: type_name::NDARRAY.to_owned(),
        decomposer: decomposer::NUMPY_ARRAY.to_owned(),
        data: Value::Map(data),
    }))
}

/// The item id (`"T<k>"`) if `v` is an ndarray download placeholder.
pub fn array_ref_item(v: &Value) -> Option<&str> {
    let t = v.as_tagged()?;
    if t.type_name != type_name::NDARRAY {
        return None;
    }
    let m = t.data.as_map()?;
    if m.get("type").and_then(Value::as_str) != Some(NDARRAY_REF) {
        return None;
    }
    m.get("data").and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn text(dot: u8, s: &str) -> Datum {
        Datum {
            kind: DatumKind::Text,
            dot,
            id: Uuid::nil(),
            content: Bytes::from(s.to_owned()),
        }
    }

    #[test]
    fn python_reference_text_parses_with_its_dot() {
        let r =
            DownloadRef::from_datum(&text(6, r#"{"fqcn": "server.J", "ref_id": "u-1"}"#)).unwrap();
        assert_eq!(
            (r.fqcn.as_str(), r.ref_id.as_str(), r.dot),
            ("server.J", "u-1", 6)
        );
    }

    #[test]
    fn malformed_references_are_errors() {
        for bad in [
            r#"{"fqcn": "s"}"#,
            "[]",
            "nope",
            r#"{"fqcn": 1, "ref_id": "x"}"#,
            r#"{"fqcn": "", "ref_id": "x"}"#,
        ] {
            assert!(DownloadRef::from_datum(&text(3, bad)).is_err(), "{bad}");
        }
        let mut blob = text(3, r#"{"fqcn": "s", "ref_id": "x"}"#);
        blob.kind = DatumKind::Blob;
        assert_eq!(DownloadRef::from_datum(&blob), Err(RefError::NotText));
        let long = format!(
            r#"{{"fqcn": "{}", "ref_id": "x"}}"#,
            "a".repeat(MAX_REF_TEXT)
        );
        assert!(matches!(
            DownloadRef::from_datum(&text(3, &long)),
            Err(RefError::TooLong(_))
        ));
    }

    #[test]
    fn header_value_must_be_a_list_of_complete_maps() {
        assert!(refs_from_value(&Value::from("x")).is_err());
        let mut m = Map::new();
        m.insert("fqcn", "a");
        assert!(refs_from_value(&Value::Array(vec![Value::Map(m)])).is_err());
    }

    #[test]
    fn placeholders_are_recognised_and_others_are_not() {
        assert_eq!(array_ref_item(&array_ref(0)), Some("T0"));
        assert_eq!(array_ref_item(&Value::from("T0")), None);
    }
}
