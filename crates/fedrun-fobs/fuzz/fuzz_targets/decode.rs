//! Fuzz target: every decoder must return (a value or a typed error) on any input, whatever
//! decodes must encode again, and no decoder may hold more than the documented bound of heap
//! (`DECODE_MEMORY_FACTOR` × the input's length + 1 MiB) while it runs: a counting global
//! allocator measures each call, and a breach is a crash the fuzzer reports.
#![no_main]

use std::alloc::System;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use peakmem_alloc::{PeakMemAlloc, PeakMemAllocTrait, INSTRUMENTED_SYSTEM};

#[global_allocator]
static HEAP: &PeakMemAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Runs `f`, then panics if the heap it held passed the bound for an input of `len` bytes.
fn bounded<T>(what: &str, len: usize, f: impl FnOnce() -> T) -> T {
    HEAP.reset_peak_memory();
    let out = f();
    let peak = HEAP.get_peak_memory();
    let bound = fedrun_fobs::DECODE_MEMORY_FACTOR * len + (1 << 20);
    assert!(
        peak <= bound,
        "{what} held {peak} bytes for {len} bytes of input (bound {bound})"
    );
    out
}

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    let len = input.len();
    if let Ok(payload) = bounded("decode", len, || fedrun_fobs::decode(input.clone())) {
        let _ = fedrun_fobs::encode_payload(&payload, &fedrun_fobs::EncodeOptions::default());
    }
    if let Ok(value) = bounded("decode_value", len, || {
        fedrun_fobs::decode_value(input.clone())
    }) {
        let _ = fedrun_fobs::encode_value(&value);
    }
    let _ = bounded("msgpack::decode", len, || {
        fedrun_fobs::msgpack::decode(input.clone())
    });
    let _ = bounded("from_npy", len, || {
        fedrun_core::NdArray::from_npy(input.clone())
    });
});
