//! Byte-exact round trips of every FOBS payload NVFlare 2.9 produced in the captured vectors.
//!
//! Decoding then re-encoding must give back the very same bytes: that is what proves the codec
//! reads and writes NVFlare's format, not an approximation of it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;
use fedrun_core::ndarray::DType;
use fedrun_core::Value;
use fedrun_fobs::{
    decode, encode_payload, encode_segments, EncodeOptions, Payload, DEFAULT_MAX_VALUE_SIZE,
};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/nvflare-2.9")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(data_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn json_lines(name: &str) -> Vec<serde_json::Value> {
    read(name)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Decode, then re-encode with the datum ids the decoder resolved; panics with context on any
/// difference.
fn round_trip(what: &str, bytes: &[u8], max_value_size: usize) -> Payload {
    let input = Bytes::copy_from_slice(bytes);
    let payload = decode(input.clone()).unwrap_or_else(|e| panic!("{what}: decode failed: {e}"));
    let opts = EncodeOptions {
        max_value_size,
        datum_ids: None,
    };
    let again = encode_payload(&payload, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
    if again != input {
        let at = again
            .iter()
            .zip(input.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(again.len().min(input.len()));
        panic!(
            "{what}: re-encoding differs at byte {at} (lengths {} vs {})\n  got  {}\n  want {}",
            again.len(),
            input.len(),
            hex::encode(&again[at.saturating_sub(16)..(at + 48).min(again.len())]),
            hex::encode(&input[at.saturating_sub(16)..(at + 48).min(input.len())]),
        );
    }
    if payload.extra_datums.is_empty() {
        let opts = EncodeOptions {
            max_value_size,
            datum_ids: Some(payload.datum_ids.clone()),
        };
        let segments = encode_segments(&payload.value, &opts)
            .unwrap_or_else(|e| panic!("{what}: segments: {e}"));
        assert!(
            segments.concat() == input,
            "{what}: the segments do not concatenate to the vector"
        );
    }
    payload
}

fn fobs_vectors() -> HashMap<String, Payload> {
    let mut out = HashMap::new();
    for v in json_lines("fobs_vectors.jsonl") {
        let name = v["name"].as_str().unwrap().to_owned();
        let bytes = hex::decode(v["lobs_hex"].as_str().unwrap()).unwrap();
        // the datum vector was made with max_value_size = 1024
        let max = if name == "shareable_datums" {
            1024
        } else {
            DEFAULT_MAX_VALUE_SIZE
        };
        let p = round_trip(&name, &bytes, max);
        out.insert(name, p);
    }
    out
}

/// The frames of a capture, by index: tab-separated `idx dir phase frame_hex description`
/// (`-` instead of hex marks a connection event such as EOF, not a frame).
fn frames(name: &str) -> HashMap<u64, Vec<u8>> {
    read(name)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            assert!(cols.len() >= 4, "{name}: malformed line {l:?}");
            if cols[3] == "-" {
                return None;
            }
            Some((cols[0].parse().unwrap(), hex::decode(cols[3]).unwrap()))
        })
        .collect()
}

/// The payload of an SFM frame: after the 16-byte prefix and `header_len` bytes of headers.
fn frame_payload(frame: &[u8]) -> &[u8] {
    let header_len = usize::from(u16::from_be_bytes([frame[4], frame[5]]));
    &frame[16 + header_len..]
}

/// A payload that Python sent as a Shareable must decode into a typed Shareable (not a tagged
/// object or a plain map), and plain values must stay plain.
fn check_top_level_type(what: &str, tree: &serde_json::Value, value: &Value) {
    match tree.get("__fobs_type__").and_then(|t| t.as_str()) {
        Some("nvflare.apis.shareable.Shareable") => {
            assert!(
                value.as_shareable().is_some(),
                "{what}: not a Shareable: {}",
                value.kind()
            )
        }
        Some(_) => assert!(value.as_tagged().is_some(), "{what}: {}", value.kind()),
        None if tree.is_object() => assert!(value.as_map().is_some(), "{what}: {}", value.kind()),
        None => {}
    }
}

/// Round-trips every FOBS payload and stream blob of one capture; returns how many.
fn capture_round_trips(capture: &str) -> usize {
    let frames = frames(&format!("{capture}_vectors.txt"));
    let mut count = 0;
    for line in json_lines(&format!("{capture}_vectors.decoded.jsonl")) {
        let idx = line["idx"].as_u64().unwrap();
        if line.get("payload_fobs").is_some() {
            let frame = frames
                .get(&idx)
                .unwrap_or_else(|| panic!("{capture} #{idx}: frame missing"));
            let what = format!("{capture} #{idx} payload");
            let p = round_trip(&what, frame_payload(frame), DEFAULT_MAX_VALUE_SIZE);
            check_top_level_type(&what, &line["payload_fobs"], &p.value);
            count += 1;
        }
        if let (Some(blob), Some(tree)) = (line.get("blob_hex"), line.get("blob_fobs")) {
            let blob = hex::decode(blob.as_str().unwrap()).unwrap();
            let what = format!("{capture} #{idx} blob");
            let p = round_trip(&what, &blob, DEFAULT_MAX_VALUE_SIZE);
            check_top_level_type(&what, tree, &p.value);
            count += 1;
        }
    }
    count
}

#[test]
fn every_captured_fobs_payload_round_trips_byte_exactly() {
    let standalone = fobs_vectors().len();
    let mut per_capture = Vec::new();
    for capture in ["loopback", "foreign", "sim", "poc"] {
        per_capture.push((capture, capture_round_trips(capture)));
    }
    let in_frames: usize = per_capture.iter().map(|(_, n)| n).sum();
    println!(
        "FOBS round trips: {standalone} stand-alone + {in_frames} in captured frames {per_capture:?} = {}",
        standalone + in_frames
    );
    assert_eq!(standalone, 10, "stand-alone FOBS vectors");
    assert_eq!(
        per_capture,
        vec![("loopback", 22), ("foreign", 22), ("sim", 37), ("poc", 116)]
    );
    assert_eq!(standalone + in_frames, 207);
}

#[test]
fn dxo_weights_carry_an_f32_array_of_ones() {
    let v = fobs_vectors();
    let s = v["dxo_weights"].value.as_shareable().unwrap();
    let dxo = s.get("DXO").and_then(Value::as_map).unwrap();
    let kind = dxo.get("kind").and_then(Value::as_tagged).unwrap();
    assert_eq!(kind.type_name, "nvflare.apis.dxo.DataKind");
    assert_eq!(kind.data.as_str(), Some("WEIGHTS"));
    let layer0 = dxo
        .get("data")
        .and_then(Value::as_map)
        .and_then(|m| m.get("layer0"))
        .and_then(Value::as_ndarray)
        .unwrap();
    assert_eq!(layer0.dtype(), &DType::F32);
    assert_eq!(layer0.shape(), &[2]);
    assert_eq!(layer0.to_f32_vec().unwrap(), vec![1.0, 1.0]);
    assert_eq!(
        s.header_or_none("__content_type__").and_then(Value::as_str),
        Some("DXO")
    );
}

#[test]
fn get_task_request_carries_the_peer_context() {
    let v = fobs_vectors();
    let s = v["get_task_request_like"].value.as_shareable().unwrap();
    let ctx = s.peer_context().unwrap();
    assert!(ctx.model.is_nil());
    assert_eq!(
        ctx.get("__identity_name__").and_then(Value::as_str),
        Some("site-1")
    );
    assert_eq!(
        ctx.get("__run_num__").and_then(Value::as_str),
        Some("job123")
    );
    assert_eq!(ctx.props[0].1.mask, 0);
    assert_eq!(
        s.header_or_none("last_task_id").and_then(Value::as_str),
        Some("tid-0")
    );
}

#[test]
fn scalars_keep_their_full_range_and_non_string_keys() {
    let v = fobs_vectors();
    let s = v["shareable_scalars"].value.as_shareable().unwrap();
    assert_eq!(s.get("u64").and_then(Value::as_u64), Some(u64::MAX));
    assert_eq!(s.get("i_neg").and_then(Value::as_i64), Some(-300));
    assert_eq!(s.get("i_big").and_then(Value::as_i64), Some(1 << 40));
    assert_eq!(s.get("f").and_then(Value::as_f64), Some(0.1));
    assert_eq!(s.get("str").and_then(Value::as_str), Some("h\u{e9}llo"));
    assert_eq!(
        s.get("bin").and_then(Value::as_bin).map(|b| &b[..]),
        Some(&[0u8, 0xff][..])
    );
    let int_keys = s.get("int_keys").and_then(Value::as_map).unwrap();
    assert_eq!(
        int_keys.get_value(&Value::from(1)),
        Some(&Value::from("one"))
    );
    assert_eq!(s.return_code().as_str(), "OK");
}

#[test]
fn tagged_builtins_become_typed_values_or_stay_opaque() {
    let v = fobs_vectors();
    let s = v["shareable_tagged_builtins"].value.as_shareable().unwrap();
    assert_eq!(
        s.get("tuple"),
        Some(&Value::Tuple(vec![Value::from(1), Value::from("a")]))
    );
    assert_eq!(s.get("set"), Some(&Value::Set(vec![Value::from(3)])));
    for (key, type_name) in [
        ("odict", "collections.OrderedDict"),
        ("datetime", "datetime.datetime"),
        ("np_f32", "numpy.float32"),
        ("np_i64", "numpy.int64"),
    ] {
        let t = s.get(key).and_then(Value::as_tagged).unwrap();
        assert_eq!(t.type_name, type_name);
    }
    let flmodel = v["flmodel"].value.as_tagged().unwrap();
    assert!(matches!(flmodel.data, Value::Tuple(_)));
}

#[test]
fn native_ndarrays_decode_with_shape_and_dtype() {
    let v = fobs_vectors();
    let s = v["shareable_ndarray_native"].value.as_shareable().unwrap();
    let a = s.get("a_f32").and_then(Value::as_ndarray).unwrap();
    assert_eq!(a.shape(), &[2, 3]);
    assert_eq!(a.to_f32_vec().unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let b = s.get("a_i64").and_then(Value::as_ndarray).unwrap();
    assert_eq!(b.to_i64_vec().unwrap(), vec![1, -1]);
    let c = s.get("a_f64_scalar0d").and_then(Value::as_ndarray).unwrap();
    assert!(c.shape().is_empty());
    assert_eq!(c.to_f64_vec().unwrap(), vec![3.25]);
}

#[test]
fn constructed_arrays_are_byte_identical_to_numpy() {
    let v = fobs_vectors();
    let s = v["shareable_ndarray_native"].value.as_shareable().unwrap();
    let a = s.get("a_f32").and_then(Value::as_ndarray).unwrap();
    let mine = fedrun_core::NdArray::from_f32(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    assert_eq!(mine.npy(), a.npy());
    let b = s.get("a_i64").and_then(Value::as_ndarray).unwrap();
    assert_eq!(
        fedrun_core::NdArray::from_i64(&[2], &[1, -1])
            .unwrap()
            .npy(),
        b.npy()
    );
    let c = s.get("a_f64_scalar0d").and_then(Value::as_ndarray).unwrap();
    assert_eq!(
        fedrun_core::NdArray::from_f64(&[], &[3.25]).unwrap().npy(),
        c.npy()
    );
    let d = v["dxo_weights"].value.as_shareable().unwrap();
    let layer0 = d
        .get("DXO")
        .and_then(Value::as_map)
        .and_then(|m| m.get("data"))
        .and_then(Value::as_map)
        .and_then(|m| m.get("layer0"))
        .and_then(Value::as_ndarray)
        .unwrap();
    assert_eq!(
        fedrun_core::NdArray::from_f32(&[2], &[1.0, 1.0])
            .unwrap()
            .npy(),
        layer0.npy()
    );
}

#[test]
fn datums_are_resolved_in_place() {
    let v = fobs_vectors();
    let raw: Vec<serde_json::Value> = json_lines("fobs_vectors.jsonl");
    let line = raw
        .iter()
        .find(|l| l["name"] == "shareable_datums")
        .unwrap();
    let datums = line["datums"].as_array().unwrap();
    let p = &v["shareable_datums"];
    assert_eq!(p.datum_ids.len(), 2);
    assert!(p.extra_datums.is_empty());
    let s = p.value.as_shareable().unwrap();
    let big_bin = s.get("big_bin").and_then(Value::as_bin).unwrap();
    let blob = datums.iter().find(|d| d["marker"] == 102).unwrap();
    assert_eq!(hex::encode(big_bin), blob["value_hex"].as_str().unwrap());
    assert_eq!(p.datum_ids[0].to_string(), blob["id"].as_str().unwrap());
    let big_str = s.get("big_str").and_then(Value::as_str).unwrap();
    assert!(big_str.chars().count() >= 1024);
    assert_eq!(
        s.get("small").and_then(Value::as_bin).map(|b| b.len()),
        Some(1)
    );
}
