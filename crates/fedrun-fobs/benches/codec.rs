//! Codec throughput against a plain memory copy of the same bytes.
//!
//! Three payloads: a Shareable holding a 64 MiB float32 ndarray (with NVFlare's default 10 MiB
//! `max_value_size` its `.npy` becomes a BLOB datum, as in real NVFlare traffic), a Shareable
//! holding 10 000 small entries, and the baseline: copying the 64 MiB buffer.

#![allow(missing_docs, clippy::unwrap_used)]

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use fedrun_core::{NdArray, Shareable, Value};
use fedrun_fobs::{decode, encode};
use std::time::Duration;

const BIG_ELEMENTS: usize = 16 * 1024 * 1024; // 64 MiB of f32

fn big_array_shareable() -> Value {
    let data: Vec<f32> = (0..BIG_ELEMENTS).map(|i| i as f32).collect();
    let array = NdArray::from_f32(&[4096, BIG_ELEMENTS / 4096], &data).unwrap();
    let mut s = Shareable::new();
    s.set_header("__task_name__", "train");
    s.insert("weights", array);
    Value::from(s)
}

fn small_entries_shareable() -> Value {
    let mut s = Shareable::new();
    for i in 0..10_000u64 {
        let v = match i % 3 {
            0 => Value::from(i),
            1 => Value::from(i as f64 * 0.5),
            _ => Value::from(format!("value-{i}")),
        };
        s.insert(format!("k{i}"), v);
    }
    Value::from(s)
}

fn big(c: &mut Criterion) {
    let value = big_array_shareable();
    let encoded = encode(&value).unwrap();
    let raw: Vec<u8> = vec![7u8; BIG_ELEMENTS * 4];

    let mut g = c.benchmark_group("64MiB_f32_ndarray");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("plain_copy", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(raw.len());
            out.extend_from_slice(black_box(&raw));
            out
        })
    });
    g.bench_function("encode", |b| b.iter(|| encode(black_box(&value)).unwrap()));
    g.bench_function("decode", |b| {
        b.iter(|| decode(black_box(encoded.clone())).unwrap())
    });
    g.bench_function("decode_and_read_f32", |b| {
        b.iter(|| {
            let p = decode(black_box(encoded.clone())).unwrap();
            let a = p
                .value
                .as_shareable()
                .and_then(|s| s.get("weights"))
                .and_then(Value::as_ndarray)
                .unwrap()
                .clone();
            a.to_f32_vec().unwrap()
        })
    });
    g.finish();
}

fn small(c: &mut Criterion) {
    let value = small_entries_shareable();
    let encoded: Bytes = encode(&value).unwrap();
    let raw: Vec<u8> = vec![7u8; encoded.len()];

    let mut g = c.benchmark_group("10k_small_entries");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("plain_copy", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(raw.len());
            out.extend_from_slice(black_box(&raw));
            out
        })
    });
    g.bench_function("encode", |b| b.iter(|| encode(black_box(&value)).unwrap()));
    g.bench_function("decode", |b| {
        b.iter(|| decode(black_box(encoded.clone())).unwrap())
    });
    g.finish();
}

criterion_group!(benches, big, small);
criterion_main!(benches);
