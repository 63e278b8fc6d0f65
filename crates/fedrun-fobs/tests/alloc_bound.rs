//! The decoders' memory guarantee, measured: whatever bytes a peer sends, decoding holds at most
//! `DECODE_MEMORY_FACTOR` × the input's length + 1 MiB of heap at any moment, and a payload of
//! many tiny values is refused past the value limit instead of growing without bound.
//!
//! A counting global allocator records the peak of live heap bytes while one decode runs (the
//! input is allocated before the measurement starts and is not counted). The tests share one
//! lock, so that no other test's allocations are measured.

#![allow(clippy::unwrap_used)]

use std::alloc::System;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use fedrun_core::{NdArray, Value};
use fedrun_fobs::msgpack::{self, DEFAULT_MAX_VALUES};
use fedrun_fobs::{decode, decode_value, FobsError, DECODE_MEMORY_FACTOR};
use peakmem_alloc::{PeakMemAlloc, PeakMemAllocTrait, INSTRUMENTED_SYSTEM};
use proptest::prelude::*;

#[global_allocator]
static HEAP: &PeakMemAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The constant part of the bound: the decoder's stack of open containers (512 levels) and
/// small bookkeeping.
const SLACK: usize = 1024 * 1024;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn exclusive() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The peak of live heap bytes while every decoder runs on `input` (results dropped inside).
fn peak_decoding(input: &Bytes) -> usize {
    let mut worst = 0;
    for run in 0..3 {
        HEAP.reset_peak_memory();
        match run {
            0 => drop(decode(input.clone())),
            1 => drop(decode_value(input.clone())),
            _ => drop(msgpack::decode(input.clone())),
        }
        worst = worst.max(HEAP.get_peak_memory());
    }
    worst
}

fn assert_bounded(what: &str, input: &Bytes) -> usize {
    let peak = peak_decoding(input);
    let bound = DECODE_MEMORY_FACTOR * input.len() + SLACK;
    if std::env::var_os("FEDRUN_PRINT_PEAKS").is_some() && input.len() > 4096 {
        eprintln!(
            "peak {what}: {} bytes -> {peak} ({:.1} x)",
            input.len(),
            peak as f64 / input.len() as f64
        );
    }
    assert!(
        peak <= bound,
        "{what}: decoding {} bytes held {peak} bytes, more than {DECODE_MEMORY_FACTOR} x input + {SLACK} = {bound}",
        input.len()
    );
    peak
}

/// `body` as the main section of a LOBS container.
fn lobs(body: &[u8]) -> Vec<u8> {
    let mut out = vec![100u8, 0];
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A datum section (TEXT = 101, BLOB = 102) whose id is `id`.
fn datum(marker: u8, id: u128, content: &[u8]) -> Vec<u8> {
    let mut out = vec![marker, 0];
    out.extend_from_slice(&((16 + content.len()) as u64).to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(content);
    out
}

fn array32(n: u32) -> Vec<u8> {
    let mut v = vec![0xdd];
    v.extend_from_slice(&n.to_be_bytes());
    v
}

fn map32(n: u32) -> Vec<u8> {
    let mut v = vec![0xdf];
    v.extend_from_slice(&n.to_be_bytes());
    v
}

fn fixstr(s: &str) -> Vec<u8> {
    let mut v = vec![0xa0 | s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

fn str8(s: &str) -> Vec<u8> {
    let mut v = vec![0xd9, s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

/// The msgpack of a FOBS-tagged object.
fn tagged(type_name: &str, data: &[u8], decomposer: &str) -> Vec<u8> {
    let mut v = vec![0x83];
    v.extend(fixstr("__fobs_type__"));
    v.extend(str8(type_name));
    v.extend(fixstr("__fobs_data__"));
    v.extend_from_slice(data);
    v.extend(fixstr("__fobs_dc__"));
    v.extend(str8(decomposer));
    v
}

fn datum_ref(id: u128) -> Vec<u8> {
    let mut data = vec![0x81];
    data.extend(fixstr("data"));
    data.push(0x82);
    data.extend(fixstr("datum_id"));
    data.extend(str8(&uuid::Uuid::from_u128(id).hyphenated().to_string()));
    data.extend(fixstr("unwrap"));
    data.push(0xc3);
    tagged(
        "nvflare.fuel.utils.fobs.datum.DatumRef",
        &data,
        "nvflare.fuel.utils.fobs.decomposer.DataClassDecomposer",
    )
}

/// The densest Shareable: 16 Ki entries of a two-character key and a nil (4 bytes each).
fn dense_shareable() -> Vec<u8> {
    let keys: Vec<String> = (0..128u8)
        .flat_map(|a| (0..128u8).map(move |b| String::from_utf8(vec![a, b]).unwrap()))
        .collect();
    let mut data = map32(keys.len() as u32 + 1);
    data.extend(fixstr("__headers__"));
    data.push(0x80);
    for k in &keys {
        data.extend(fixstr(k));
        data.push(0xc0);
    }
    tagged(
        "nvflare.apis.shareable.Shareable",
        &data,
        "nvflare.fuel.utils.fobs.decomposer.DictDecomposer",
    )
}

#[test]
fn a_value_is_the_48_bytes_the_documented_bound_counts() {
    assert_eq!(std::mem::size_of::<Value>(), 48);
}

#[test]
fn decoding_never_holds_more_than_k_times_the_input_for_flat_arrays_of_nils() {
    let _one = exclusive();
    for n in [0usize, 1, 15, 16, 1000, 100_000, 1 << 20] {
        let mut body = array32(n as u32);
        body.resize(body.len() + n, 0xc0);
        assert_bounded("array of nils", &Bytes::from(body.clone()));
        assert_bounded("array of nils in LOBS", &Bytes::from(lobs(&body)));
    }
}

#[test]
fn a_declared_count_the_input_cannot_hold_reserves_nothing() {
    let _one = exclusive();
    // 2^31 elements declared, 1 MiB of nils present
    let mut body = array32(1 << 31);
    body.resize(body.len() + (1 << 20), 0xc0);
    let input = Bytes::from(lobs(&body));
    HEAP.reset_peak_memory();
    let err = decode(input.clone()).unwrap_err();
    let peak = HEAP.get_peak_memory();
    assert!(matches!(err, FobsError::LengthPastEnd { .. }), "{err:?}");
    assert!(peak < SLACK, "refusing the header held {peak} bytes");
    // every other header that declares a size: str, bin, ext, map
    for header in [
        &[0xdb, 0x7f, 0xff, 0xff, 0xff][..],
        &[0xc6, 0xff, 0xff, 0xff, 0xff],
        &[0xc9, 0xff, 0xff, 0xff, 0xff, 0x01],
        &[0xdf, 0xff, 0xff, 0xff, 0xff],
        &[0xdd, 0xff, 0xff, 0xff, 0xff],
    ] {
        let mut body = header.to_vec();
        body.resize(body.len() + 4096, 0xc0);
        let peak = assert_bounded("huge header", &Bytes::from(body.clone()));
        assert!(peak < SLACK, "{header:02x?}: {peak}");
        assert_bounded("huge header in LOBS", &Bytes::from(lobs(&body)));
    }
}

#[test]
fn nested_containers_cannot_reserve_the_same_bytes_twice() {
    let _one = exclusive();
    // 500 levels, each claiming as many elements as the bytes that follow it: before the fix
    // every level reserved 48 bytes per remaining input byte (500 x 48 x the input)
    let nils = 1 << 20;
    let depth = 500;
    let mut body = Vec::new();
    for level in 0..depth {
        let below = (depth - level - 1) * 5 + nils;
        body.extend(array32(below as u32));
    }
    body.resize(body.len() + nils, 0xc0);
    let input = Bytes::from(lobs(&body));
    assert_bounded("nested claims", &input);
    // and nested arrays of nils that are valid: 64 lists of 64 lists of 15 nils
    let mut body = vec![0xdc, 0, 64];
    for _ in 0..64 {
        body.extend([0xdc, 0, 64]);
        for _ in 0..64 {
            body.push(0x9f);
            body.extend([0xc0; 15]);
        }
    }
    assert!(decode_value(Bytes::from(body.clone())).is_ok());
    assert_bounded("nested nils", &Bytes::from(body));
}

#[test]
fn maps_and_lifted_objects_stay_within_the_bound() {
    let _one = exclusive();
    // a map of nil: nil pairs
    let n = 200_000;
    let mut body = map32(n);
    body.resize(body.len() + 2 * n as usize, 0xc0);
    assert_bounded("map of nils", &Bytes::from(body));
    // a Shareable with many short unique keys (lifted into its own index)
    let n = 100_000u32;
    let mut data = map32(n + 1);
    data.extend(fixstr("__headers__"));
    data.push(0x80);
    for i in 0..n {
        data.extend(fixstr(&format!("{i:x}")));
        data.push(0xc0);
    }
    let body = tagged(
        "nvflare.apis.shareable.Shareable",
        &data,
        "nvflare.fuel.utils.fobs.decomposer.DictDecomposer",
    );
    let input = Bytes::from(lobs(&body));
    assert!(decode(input.clone())
        .unwrap()
        .value
        .as_shareable()
        .is_some());
    assert_bounded("big shareable", &input);
    let input = Bytes::from(lobs(&dense_shareable()));
    assert!(decode(input.clone())
        .unwrap()
        .value
        .as_shareable()
        .is_some());
    assert_bounded("dense shareable", &input);
    // a list of many small tuples and sets
    let mut body = array32(20_000);
    for i in 0..20_000 {
        let items = [0x91, 0xc0];
        let (t, d) = if i % 2 == 0 {
            (
                "builtins.tuple",
                "nvflare.fuel.utils.fobs.decomposers.core_decomposers.TupleDecomposer",
            )
        } else {
            (
                "builtins.set",
                "nvflare.fuel.utils.fobs.decomposers.core_decomposers.SetDecomposer",
            )
        };
        body.extend(tagged(t, &items, d));
    }
    assert_bounded("tuples and sets", &Bytes::from(lobs(&body)));
}

#[test]
fn datum_sections_with_bogus_counts_and_reused_text_stay_within_the_bound() {
    let _one = exclusive();
    // many minimal datum sections
    let mut input = lobs(&[0xc0]);
    for i in 0..50_000u128 {
        input.extend(datum(102, i + 1, &[]));
    }
    assert_bounded("many datums", &Bytes::from(input));
    // a section that claims far more than there is
    let mut input = lobs(&[0xc0]);
    input.extend([102, 0]);
    input.extend(u64::MAX.to_be_bytes());
    input.extend([0u8; 64]);
    assert_bounded("datum past end", &Bytes::from(input));
    // one 1 MiB TEXT datum referenced 2000 times: copied once per reference it would be 2 GiB
    let mut body = array32(2000);
    for _ in 0..2000 {
        body.extend(datum_ref(7));
    }
    let mut input = lobs(&body);
    input.extend(datum(101, 7, &vec![b'x'; 1 << 20]));
    let input = Bytes::from(input);
    let err = decode(input.clone()).unwrap_err();
    assert!(matches!(err, FobsError::DatumTextReused { .. }), "{err:?}");
    assert_bounded("reused text datum", &input);
    // referenced once it resolves
    let mut input = lobs(&datum_ref(7));
    input.extend(datum(101, 7, b"hello"));
    assert_eq!(
        decode(Bytes::from(input)).unwrap().value.as_str(),
        Some("hello")
    );
}

#[test]
fn more_values_than_the_limit_are_refused_before_they_are_decoded() {
    let _one = exclusive();
    // the row 1: an array of 8 Mi nils, declared exactly
    let n = 8 * 1024 * 1024;
    let mut body = array32(n as u32);
    body.resize(body.len() + n, 0xc0);
    let input = Bytes::from(lobs(&body));
    HEAP.reset_peak_memory();
    let err = decode(input).unwrap_err();
    let peak = HEAP.get_peak_memory();
    assert!(
        matches!(err, FobsError::TooManyValues { limit, .. } if limit == DEFAULT_MAX_VALUES),
        "{err:?}"
    );
    assert!(peak < SLACK, "refusing 8 Mi nils held {peak} bytes");
    // many small lists whose values add up past the limit: refused when the limit is reached,
    // having held at most the limit's worth of values
    let lists = DEFAULT_MAX_VALUES / 16 + 1;
    let mut body = array32(lists as u32);
    for _ in 0..lists {
        body.push(0x9f);
        body.extend([0xc0; 15]);
    }
    let input = Bytes::from(lobs(&body));
    HEAP.reset_peak_memory();
    let err = decode(input.clone()).unwrap_err();
    let peak = HEAP.get_peak_memory();
    assert!(matches!(err, FobsError::TooManyValues { .. }), "{err:?}");
    assert!(
        peak <= 48 * DEFAULT_MAX_VALUES + 2 * input.len() + SLACK,
        "held {peak} bytes"
    );
}

#[test]
fn past_the_value_limit_lifted_objects_are_bounded_by_the_limit_not_the_input() {
    let _one = exclusive();
    // 80 of the densest Shareables: 2.6 Mi values, refused at the limit
    let shareable = dense_shareable();
    let mut body = array32(80);
    for _ in 0..80 {
        body.extend_from_slice(&shareable);
    }
    let input = Bytes::from(lobs(&body));
    HEAP.reset_peak_memory();
    let err = decode(input.clone()).unwrap_err();
    let peak = HEAP.get_peak_memory();
    assert!(matches!(err, FobsError::TooManyValues { .. }), "{err:?}");
    assert!(
        peak <= 128 * DEFAULT_MAX_VALUES + 2 * input.len() + SLACK,
        "held {peak} bytes"
    );
}

fn npy() -> Vec<u8> {
    NdArray::from_f32(&[2, 2], &[1.0, 2.0, 3.0, 4.0])
        .unwrap()
        .npy()
        .to_vec()
}

/// Shapes a generator builds: a container header with a random count, followed by random
/// filler drawn from one-byte values, headers and strings.
fn adversarial() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        any::<u32>().prop_map(array32),
        any::<u32>().prop_map(map32),
        any::<u16>().prop_map(|n| [vec![0xdc], n.to_be_bytes().to_vec()].concat()),
        any::<u16>().prop_map(|n| [vec![0xde], n.to_be_bytes().to_vec()].concat()),
        any::<u32>().prop_map(|n| [vec![0xdb], n.to_be_bytes().to_vec()].concat()),
        any::<u32>().prop_map(|n| [vec![0xc6], n.to_be_bytes().to_vec()].concat()),
        any::<u32>().prop_map(|n| [vec![0xc9], n.to_be_bytes().to_vec(), vec![1]].concat()),
        (0u8..16).prop_map(|n| vec![0x90 | n]),
        (0u8..16).prop_map(|n| vec![0x80 | n]),
        Just(vec![0xc0]),
        Just(vec![0xa0]),
        Just(npy()),
    ];
    (
        proptest::collection::vec(header, 1..64),
        0usize..20_000,
        any::<u8>(),
    )
        .prop_map(|(heads, fill, byte)| {
            let mut v: Vec<u8> = heads.concat();
            v.resize(v.len() + fill, if byte % 2 == 0 { 0xc0 } else { byte });
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, rng_seed: proptest::test_runner::RngSeed::Fixed(10), ..ProptestConfig::default() })]

    #[test]
    fn decoding_never_holds_more_than_k_times_the_input_for_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _one = exclusive();
        let input = Bytes::from(bytes);
        assert_bounded("random", &input);
        assert_bounded("random in LOBS", &Bytes::from(lobs(&input)));
    }

    #[test]
    fn decoding_never_holds_more_than_k_times_the_input_for_adversarial_shapes(bytes in adversarial()) {
        let _one = exclusive();
        assert_bounded("adversarial", &Bytes::from(bytes.clone()));
        assert_bounded("adversarial in LOBS", &Bytes::from(lobs(&bytes)));
    }
}
