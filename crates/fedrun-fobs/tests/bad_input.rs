//! Hostile input: whatever bytes a peer sends, the decoders answer with a value or a typed
//! error, never a panic, never an allocation the input cannot justify.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedrun_core::NdArray;
use fedrun_fobs::{decode, decode_value, msgpack, FobsError};
use proptest::prelude::*;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/nvflare-2.9")
}

/// The stand-alone LOBS vectors (valid payloads to mutate).
fn lobs_vectors() -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(data_dir().join("fobs_vectors.jsonl")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            hex::decode(v["lobs_hex"].as_str().unwrap()).unwrap()
        })
        .collect()
}

/// The main msgpack body of a LOBS payload.
fn main_body(lobs: &[u8]) -> Vec<u8> {
    lobs[10..].iter().copied().take(main_len(lobs)).collect()
}

fn main_len(lobs: &[u8]) -> usize {
    let mut b = [0u8; 8];
    b.copy_from_slice(&lobs[2..10]);
    u64::from_be_bytes(b) as usize
}

fn npy_samples() -> Vec<Vec<u8>> {
    vec![
        NdArray::from_f32(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
            .unwrap()
            .npy()
            .to_vec(),
        NdArray::from_i64(&[2], &[1, -1]).unwrap().npy().to_vec(),
        NdArray::from_f64(&[], &[3.25]).unwrap().npy().to_vec(),
        NdArray::from_bool(&[1, 1, 1], &[true])
            .unwrap()
            .npy()
            .to_vec(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let n = bytes.len();
        match *m {
            Mutation::Flip(i, mask) if n > 0 => bytes[i % n] ^= mask,
            Mutation::Set(i, b) if n > 0 => bytes[i % n] = b,
            Mutation::Insert(i, b) => bytes.insert(i % (n + 1), b),
            Mutation::Delete(i) if n > 0 => {
                bytes.remove(i % n);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (n + 1)),
            _ => {}
        }
    }
    bytes
}

/// A mutated copy of one of `samples`.
fn mutated(samples: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::sample::select(samples),
        proptest::collection::vec(mutation(), 1..6),
    )
        .prop_map(|(bytes, ms)| apply(bytes, &ms))
}

/// Decode with every decoder; the result is irrelevant, only that it returns.
fn all_decoders(bytes: &[u8]) {
    let b = Bytes::copy_from_slice(bytes);
    let _ = decode(b.clone());
    let _ = decode_value(b.clone());
    let _ = msgpack::decode(b.clone());
    let _ = NdArray::from_npy(b);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn msgpack_decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let b = Bytes::from(bytes);
        let _ = msgpack::decode(b.clone());
        let _ = decode_value(b);
    }

    #[test]
    fn msgpack_decoder_survives_mutated_vectors(bytes in mutated(lobs_vectors().iter().map(|v| main_body(v)).collect())) {
        let b = Bytes::from(bytes);
        let _ = msgpack::decode(b.clone());
        let _ = decode_value(b);
    }

    #[test]
    fn lobs_decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(Bytes::from(bytes));
    }

    #[test]
    fn lobs_decoder_survives_mutated_vectors(bytes in mutated(lobs_vectors())) {
        let _ = decode(Bytes::from(bytes));
    }

    #[test]
    fn npy_parser_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = NdArray::from_npy(Bytes::from(bytes));
    }

    #[test]
    fn npy_parser_survives_mutated_arrays(bytes in mutated(npy_samples())) {
        let _ = NdArray::from_npy(Bytes::from(bytes));
    }
}

#[test]
fn every_truncation_of_every_vector_is_an_error_not_a_panic() {
    for v in lobs_vectors() {
        for cut in 0..v.len() {
            let r = decode(Bytes::copy_from_slice(&v[..cut]));
            assert!(r.is_err(), "a vector cut at {cut} of {} decoded", v.len());
        }
        let body = main_body(&v);
        for cut in 0..body.len() {
            assert!(msgpack::decode(Bytes::copy_from_slice(&body[..cut])).is_err());
        }
    }
    for npy in npy_samples() {
        for cut in 0..npy.len() {
            assert!(NdArray::from_npy(Bytes::copy_from_slice(&npy[..cut])).is_err());
        }
    }
}

#[test]
fn huge_claimed_map_is_refused_at_once_without_allocating() {
    // map32 claiming 2^32 - 1 entries, then nothing
    let input = Bytes::from_static(b"\xdf\xff\xff\xff\xff");
    let started = Instant::now();
    let err = msgpack::decode(input.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            FobsError::LengthPastEnd {
                claimed: 4294967295,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        decode_value(input).unwrap_err(),
        FobsError::LengthPastEnd { .. }
    ));
    // the same for arrays, strings, bins and ext
    for input in [
        &b"\xdd\xff\xff\xff\xff"[..],
        &b"\xdb\xff\xff\xff\xff"[..],
        &b"\xc6\xff\xff\xff\xff"[..],
        &b"\xc9\xff\xff\xff\xff\x01"[..],
    ] {
        assert!(msgpack::decode(Bytes::copy_from_slice(input)).is_err());
    }
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn deep_nesting_is_depth_exceeded() {
    let deep = Bytes::from(vec![0x91u8; 100_000]);
    assert!(matches!(
        msgpack::decode(deep.clone()),
        Err(FobsError::DepthExceeded { limit: 512, .. })
    ));
    assert!(matches!(
        decode_value(deep.clone()),
        Err(FobsError::DepthExceeded { .. })
    ));
    let mut lobs = vec![100u8, 0];
    lobs.extend_from_slice(&(deep.len() as u64).to_be_bytes());
    lobs.extend_from_slice(&deep);
    assert!(matches!(
        decode(Bytes::from(lobs)),
        Err(FobsError::DepthExceeded { .. })
    ));
    // maps nest too
    let mut maps = Vec::new();
    for _ in 0..100_000 {
        maps.extend_from_slice(b"\x81\xa1k");
    }
    assert!(matches!(
        msgpack::decode(Bytes::from(maps)),
        Err(FobsError::DepthExceeded { .. })
    ));
}

#[test]
fn lobs_section_size_past_end_is_a_typed_error() {
    let mut v = lobs_vectors()[0].clone();
    let claimed = (v.len() as u64) * 2;
    v[2..10].copy_from_slice(&claimed.to_be_bytes());
    assert!(matches!(
        decode(Bytes::from(v)),
        Err(FobsError::SectionPastEnd { .. })
    ));
    let mut v = lobs_vectors()[0].clone();
    v[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    assert!(matches!(
        decode(Bytes::from(v)),
        Err(FobsError::SectionPastEnd { .. })
    ));
}

#[test]
fn bad_marker_and_datum_before_main_are_typed_errors() {
    let mut v = lobs_vectors()[0].clone();
    v[0] = 99;
    assert!(matches!(
        decode(Bytes::from(v)),
        Err(FobsError::BadSectionMarker { marker: 99, .. })
    ));
    let mut v = lobs_vectors()[0].clone();
    v[0] = 102;
    assert!(matches!(
        decode(Bytes::from(v)),
        Err(FobsError::MainNotFirst { marker: 102 })
    ));
}

#[test]
fn datum_reference_to_a_missing_datum_is_unknown_datum_id() {
    // shareable_datums without its datum sections
    let v = lobs_vectors();
    let with_datums = v.iter().find(|v| v.len() > 10 + main_len(v)).unwrap();
    let only_main = with_datums[..10 + main_len(with_datums)].to_vec();
    assert!(matches!(
        decode(Bytes::from(only_main)),
        Err(FobsError::UnknownDatumId(_))
    ));
}

#[test]
fn mutated_vectors_decode_to_values_that_encode() {
    // whatever decodes must also encode (no value the decoder builds is unencodable)
    let vectors = lobs_vectors();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(2_000));
    runner
        .run(&mutated(vectors), |bytes| {
            all_decoders(&bytes);
            if let Ok(p) = decode(Bytes::from(bytes)) {
                prop_assert!(fedrun_fobs::encode_payload(&p, &Default::default()).is_ok());
            }
            Ok(())
        })
        .unwrap();
}
