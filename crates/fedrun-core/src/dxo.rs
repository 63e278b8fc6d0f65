//! DXO, the "data exchange object" that training jobs put in their Shareables.
//!
//! NVFlare's learners and aggregators exchange model weights, weight differences and metrics as a
//! DXO: a data kind, a data map and a meta map. On the wire a DXO is flattened into a Shareable:
//! the header `__content_type__` is `"DXO"` and the entry `"DXO"` is the
//! map `{"kind": <DataKind enum member>, "data": {...}, "meta": {...}}`, in that key order.
//! [`Dxo::to_shareable`] produces exactly that and [`Dxo::from_shareable`] reads it back.

use std::fmt;

use crate::constants::header_key;
use crate::error::CoreError;
use crate::shareable::Shareable;
use crate::value::{Map, Value};

/// The Python class of the data-kind enum.
pub const DATA_KIND_CLASS: &str = "nvflare.apis.dxo.DataKind";
/// The value of the `__content_type__` header, and the key of the DXO map in the Shareable.
pub const DXO_CONTENT_TYPE: &str = "DXO";

/// What a DXO's data is (NVFlare's `DataKind`). Kinds fedrun does not name are kept as
/// [`DataKind::Other`] with the member name as sent.
///
/// # Example
/// ```
/// use fedrun_core::DataKind;
///
/// assert_eq!(DataKind::from_name("WEIGHT_DIFF"), DataKind::WeightDiff);
/// assert_eq!(DataKind::from_name("FL_MODEL").as_str(), "FL_MODEL");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DataKind {
    /// `WEIGHTS`: full model weights.
    Weights,
    /// `WEIGHT_DIFF`: the difference to the received weights.
    WeightDiff,
    /// `METRICS`: evaluation metrics.
    Metrics,
    /// `ANALYTIC`: analytics data.
    Analytic,
    /// `COLLECTION`: a collection of DXOs.
    Collection,
    /// `STATISTICS`: federated statistics.
    Statistics,
    /// Any other member, by name.
    Other(String),
}

impl DataKind {
    /// The enum member's name, as it travels.
    pub fn as_str(&self) -> &str {
        match self {
            DataKind::Weights => "WEIGHTS",
            DataKind::WeightDiff => "WEIGHT_DIFF",
            DataKind::Metrics => "METRICS",
            DataKind::Analytic => "ANALYTIC",
            DataKind::Collection => "COLLECTION",
            DataKind::Statistics => "STATISTICS",
            DataKind::Other(s) => s,
        }
    }

    /// The kind named `name` (exact, case-sensitive).
    pub fn from_name(name: &str) -> Self {
        match name {
            "WEIGHTS" => DataKind::Weights,
            "WEIGHT_DIFF" => DataKind::WeightDiff,
            "METRICS" => DataKind::Metrics,
            "ANALYTIC" => DataKind::Analytic,
            "COLLECTION" => DataKind::Collection,
            "STATISTICS" => DataKind::Statistics,
            other => DataKind::Other(other.to_owned()),
        }
    }

    /// The enum member as NVFlare sends it (tag `nvflare.apis.dxo.DataKind`).
    pub fn to_value(&self) -> Value {
        Value::enum_member(DATA_KIND_CLASS, self.as_str())
    }

    /// Read a kind: a `DataKind` enum member, or a plain string naming one.
    pub fn from_value(v: &Value) -> Result<Self, CoreError> {
        match v {
            Value::Str(s) => Ok(DataKind::from_name(s)),
            Value::Tagged(t) if t.type_name == DATA_KIND_CLASS => match &t.data {
                Value::Str(s) => Ok(DataKind::from_name(s)),
                other => Err(CoreError::InvalidDxo(format!(
                    "DataKind member name must be a str but got {}",
                    other.kind()
                ))),
            },
            Value::Tagged(t) => Err(CoreError::InvalidDxo(format!(
                "'kind' must be a {DATA_KIND_CLASS} but got {}",
                t.type_name
            ))),
            other => Err(CoreError::InvalidDxo(format!(
                "'kind' must be a {DATA_KIND_CLASS} but got {}",
                other.kind()
            ))),
        }
    }
}

impl fmt::Display for DataKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A data exchange object: kind, data and meta.
///
/// # Example
/// ```
/// use fedrun_core::{DataKind, Dxo, Map, Value};
///
/// let mut data = Map::new();
/// data.insert("layer0", vec![Value::from(1.0), Value::from(1.0)]);
/// let mut dxo = Dxo::new(DataKind::Weights, data);
/// dxo.meta.insert("NUM_STEPS_CURRENT_ROUND", 10);
///
/// let s = dxo.to_shareable();
/// assert_eq!(s.header_or_none("__content_type__").and_then(Value::as_str), Some("DXO"));
/// assert_eq!(Dxo::from_shareable(&s).unwrap(), dxo);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Dxo {
    /// What the data is.
    pub kind: DataKind,
    /// The data (e.g. layer name → array).
    pub data: Map,
    /// Meta information (e.g. `NUM_STEPS_CURRENT_ROUND`).
    pub meta: Map,
}

impl Dxo {
    /// A DXO with empty meta.
    pub fn new(kind: DataKind, data: Map) -> Self {
        Dxo {
            kind,
            data,
            meta: Map::new(),
        }
    }

    /// The flattened form NVFlare sends: a new Shareable with header `__content_type__ = "DXO"`
    /// and entry `"DXO" = {"kind", "data", "meta"}`.
    pub fn to_shareable(&self) -> Shareable {
        let mut s = Shareable::new();
        s.set_header(header_key::CONTENT_TYPE, DXO_CONTENT_TYPE);
        let mut d = Map::with_capacity(3);
        d.insert("kind", self.kind.to_value());
        d.insert("data", self.data.clone());
        d.insert("meta", self.meta.clone());
        s.insert(DXO_CONTENT_TYPE, d);
        s
    }

    /// Read the DXO out of a Shareable. The content type must be `"DXO"` and the `"DXO"` entry a
    /// map with a kind and a data map; a missing or nil meta reads as empty.
    pub fn from_shareable(s: &Shareable) -> Result<Dxo, CoreError> {
        match s.header(header_key::CONTENT_TYPE)? {
            Some(Value::Str(ct)) if ct == DXO_CONTENT_TYPE => {}
            Some(Value::Str(ct)) => {
                return Err(CoreError::NotADxo(format!(
                    "expected content type DXO but got {ct}"
                )))
            }
            Some(other) => {
                return Err(CoreError::NotADxo(format!(
                    "expected content type DXO but got a {}",
                    other.kind()
                )))
            }
            None => return Err(CoreError::NotADxo("no content type header".to_owned())),
        }
        let d = match s.get(DXO_CONTENT_TYPE) {
            Some(Value::Map(d)) => d,
            Some(other) => {
                return Err(CoreError::InvalidDxo(format!(
                    "the DXO entry must be a dict but got {}",
                    other.kind()
                )))
            }
            None => return Err(CoreError::InvalidDxo("missing the DXO entry".to_owned())),
        };
        let kind = match d.get("kind") {
            Some(v) => DataKind::from_value(v)?,
            None => return Err(CoreError::InvalidDxo("missing 'kind'".to_owned())),
        };
        let data = match d.get("data").map(dict_of) {
            Some(Some(m)) => m.clone(),
            Some(None) => {
                let other = d.get("data").map_or("nothing", Value::kind);
                return Err(CoreError::InvalidDxo(format!(
                    "'data' must be a dict but got {other}"
                )));
            }
            None => return Err(CoreError::InvalidDxo("missing 'data'".to_owned())),
        };
        let meta = match d.get("meta") {
            None | Some(Value::Nil) => Map::new(),
            Some(v) if dict_of(v).is_some() => dict_of(v).cloned().unwrap_or_default(),
            Some(other) => {
                return Err(CoreError::InvalidDxo(format!(
                    "'meta' must be a dict but got {}",
                    other.kind()
                )))
            }
        };
        Ok(Dxo { kind, data, meta })
    }
}

/// The NVFlare decomposer of `dict` subclasses (`Shareable`, `ModelLearnable`, ...).
const DICT_DECOMPOSER: &str = "nvflare.fuel.utils.fobs.decomposer.DictDecomposer";

/// The dict a value is, as Python sees it: a plain map, or a `dict` subclass that FOBS tagged
/// with its `DictDecomposer` (NVFlare's `NPTrainer` submits its model as a `ModelLearnable`, a
/// `dict` subclass, in a DXO's `data`; Python's DXO check accepts any dict).
fn dict_of(v: &Value) -> Option<&Map> {
    match v {
        Value::Map(m) => Some(m),
        Value::Tagged(t) if t.decomposer == DICT_DECOMPOSER => match &t.data {
            Value::Map(m) => Some(m),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::value::ENUM_DECOMPOSER;

    fn weights() -> Dxo {
        let mut data = Map::new();
        data.insert("layer0", vec![Value::from(1.0), Value::from(1.0)]);
        let mut dxo = Dxo::new(DataKind::Weights, data);
        dxo.meta.insert("NUM_STEPS_CURRENT_ROUND", 10);
        dxo
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn map_keys(v: &rmpv::Value) -> Vec<String> {
        v.as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap().to_owned())
            .collect()
    }

    fn entry<'a>(v: &'a rmpv::Value, key: &str) -> &'a rmpv::Value {
        v.as_map()
            .unwrap()
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
            .unwrap()
    }

    /// The `dxo_weights` vector, decoded from its LOBS main section.
    fn nvflare_dxo_weights() -> rmpv::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/data/nvflare-2.9/fobs_vectors.jsonl"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains("\"name\": \"dxo_weights\""))
            .unwrap();
        let start = line.find("\"lobs_hex\": \"").unwrap() + "\"lobs_hex\": \"".len();
        let end = start + line[start..].find('"').unwrap();
        let bytes = unhex(&line[start..end]);
        assert_eq!(bytes[0], 100, "main section first");
        let mut body = &bytes[10..];
        rmpv::decode::read_value(&mut body).unwrap()
    }

    #[test]
    fn to_shareable_matches_nvflare_key_order_and_kind_tag() {
        let nv = nvflare_dxo_weights();
        let nv_shareable = entry(&nv, "__fobs_data__");
        let nv_dxo = entry(nv_shareable, "DXO");
        let nv_kind = entry(nv_dxo, "kind");

        let ours = weights().to_shareable();
        let our_keys: Vec<&str> = ours.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(our_keys, map_keys(nv_shareable));
        let Some(Value::Map(our_dxo)) = ours.get("DXO") else {
            panic!("no DXO map")
        };
        let our_dxo_keys: Vec<&str> = our_dxo.keys().filter_map(Value::as_str).collect();
        assert_eq!(our_dxo_keys, map_keys(nv_dxo));
        assert_eq!(our_dxo_keys, ["kind", "data", "meta"]);

        let kind = our_dxo.get("kind").and_then(Value::as_tagged).unwrap();
        assert_eq!(
            Some(kind.type_name.as_str()),
            entry(nv_kind, "__fobs_type__").as_str()
        );
        assert_eq!(
            Some(kind.decomposer.as_str()),
            entry(nv_kind, "__fobs_dc__").as_str()
        );
        assert_eq!(kind.decomposer, ENUM_DECOMPOSER);
        assert_eq!(kind.data.as_str(), entry(nv_kind, "__fobs_data__").as_str());
        assert_eq!(
            entry(entry(nv_dxo, "meta"), "NUM_STEPS_CURRENT_ROUND").as_i64(),
            our_dxo
                .get("meta")
                .and_then(|m| m.as_map())
                .and_then(|m| m.get("NUM_STEPS_CURRENT_ROUND"))
                .and_then(Value::as_i64)
        );
        // the header NVFlare's DXO sets comes first
        let nv_headers = map_keys(entry(nv_shareable, "__headers__"));
        assert_eq!(nv_headers[0], "__content_type__");
        assert_eq!(
            ours.header_or_none("__content_type__"),
            Some(&Value::from("DXO"))
        );
    }

    #[test]
    fn dxo_round_trips_through_a_shareable() {
        let dxo = weights();
        assert_eq!(Dxo::from_shareable(&dxo.to_shareable()).unwrap(), dxo);
        let other = Dxo::new(DataKind::Other("FL_MODEL".into()), Map::new());
        assert_eq!(Dxo::from_shareable(&other.to_shareable()).unwrap(), other);
    }

    #[test]
    fn every_named_kind_round_trips_through_its_name() {
        for k in [
            DataKind::Weights,
            DataKind::WeightDiff,
            DataKind::Metrics,
            DataKind::Analytic,
            DataKind::Collection,
            DataKind::Statistics,
        ] {
            assert_eq!(DataKind::from_name(k.as_str()), k);
            assert_eq!(DataKind::from_value(&k.to_value()).unwrap(), k);
        }
        assert_eq!(
            DataKind::from_name("weights"),
            DataKind::Other("weights".into())
        );
    }

    #[test]
    fn a_plain_string_kind_is_accepted() {
        let mut s = weights().to_shareable();
        if let Some(Value::Map(d)) = s.get_mut("DXO") {
            d.insert("kind", "METRICS");
        }
        assert_eq!(Dxo::from_shareable(&s).unwrap().kind, DataKind::Metrics);
    }

    #[test]
    fn shareable_without_dxo_content_type_is_not_a_dxo() {
        let mut s = weights().to_shareable();
        s.remove_header("__content_type__");
        assert_eq!(
            Dxo::from_shareable(&s).unwrap_err(),
            CoreError::NotADxo("no content type header".into())
        );
        s.set_header("__content_type__", "FLModel");
        assert!(Dxo::from_shareable(&s)
            .unwrap_err()
            .to_string()
            .contains("expected content type DXO but got FLModel"));
    }

    #[test]
    fn malformed_dxo_entries_are_typed_errors() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("kind", Value::from(3), "'kind' must be"),
            (
                "kind",
                Value::enum_member("other.Enum", "WEIGHTS"),
                "but got other.Enum",
            ),
            (
                "data",
                Value::from("x"),
                "'data' must be a dict but got str",
            ),
            (
                "meta",
                Value::from(vec![]),
                "'meta' must be a dict but got list",
            ),
        ];
        for (key, bad, msg) in cases {
            let mut s = weights().to_shareable();
            if let Some(Value::Map(d)) = s.get_mut("DXO") {
                d.insert(key, bad);
            }
            let err = Dxo::from_shareable(&s).unwrap_err().to_string();
            assert!(err.contains(msg), "{key}: {err}");
        }
        let mut s = weights().to_shareable();
        s.insert("DXO", 1);
        assert!(matches!(
            Dxo::from_shareable(&s),
            Err(CoreError::InvalidDxo(_))
        ));
        s.remove("DXO");
        assert!(matches!(
            Dxo::from_shareable(&s),
            Err(CoreError::InvalidDxo(_))
        ));
    }

    #[test]
    fn missing_meta_reads_as_empty() {
        let mut s = weights().to_shareable();
        if let Some(Value::Map(d)) = s.get_mut("DXO") {
            d.remove("meta");
        }
        assert!(Dxo::from_shareable(&s).unwrap().meta.is_empty());
    }

    #[test]
    fn dict_subclasses_in_data_and_meta_read_as_dicts_other_tags_do_not() {
        // NVFlare's NPTrainer submits its model as a ModelLearnable, a dict subclass that FOBS
        // tags with its DictDecomposer
        let learnable = |data: Map| {
            Value::Tagged(Box::new(crate::Tagged {
                type_name: "nvflare.app_common.abstract.model.ModelLearnable".to_owned(),
                decomposer: DICT_DECOMPOSER.to_owned(),
                data: Value::Map(data),
            }))
        };
        let dxo = weights();
        let mut s = dxo.to_shareable();
        if let Some(Value::Map(d)) = s.get_mut("DXO") {
            d.insert("data", learnable(dxo.data.clone()));
            d.insert("meta", learnable(dxo.meta.clone()));
        }
        assert_eq!(Dxo::from_shareable(&s).unwrap(), dxo);

        let mut s = dxo.to_shareable();
        if let Some(Value::Map(d)) = s.get_mut("DXO") {
            d.insert("data", Value::enum_member("some.Enum", "X"));
        }
        let err = Dxo::from_shareable(&s).unwrap_err().to_string();
        assert!(err.contains("'data' must be a dict"), "{err}");
    }
}
