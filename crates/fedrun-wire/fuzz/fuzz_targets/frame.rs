//! Fuzz target: the bytes a handshaken peer sends on a connection. The SFM codec splits them into
//! frames exactly as the transport's reader does (the input arrives in two reads, split where its
//! first byte says, to exercise partial frames); every DATA frame becomes a cell message (headers
//! and FOBS payload decoded); the whole input is also decoded as one frame. Each step must return
//! a value or a typed error: never a panic, never an allocation the input cannot justify (a
//! counting global allocator checks that the whole target never holds more than
//! `DECODE_MEMORY_FACTOR` × the input's length + 2 MiB: the payload decoder's bound, plus the
//! codec's read reserve).
#![no_main]

use std::alloc::System;

use bytes::{Bytes, BytesMut};
use fedrun_wire::{message_from_frame, Frame, FrameType, SfmCodec};
use libfuzzer_sys::fuzz_target;
use peakmem_alloc::{PeakMemAlloc, PeakMemAllocTrait, INSTRUMENTED_SYSTEM};
use tokio_util::codec::Decoder;

#[global_allocator]
static HEAP: &PeakMemAlloc<System> = &INSTRUMENTED_SYSTEM;

fuzz_target!(|data: &[u8]| {
    HEAP.reset_peak_memory();
    frames(data);
    let peak = HEAP.get_peak_memory();
    let bound = fedrun_fobs::DECODE_MEMORY_FACTOR * data.len() + (2 << 20);
    assert!(
        peak <= bound,
        "held {peak} bytes for {} bytes of input (bound {bound})",
        data.len()
    );
});

fn frames(data: &[u8]) {
    let _ = Frame::decode(Bytes::copy_from_slice(data));

    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut codec = SfmCodec::new();
    let mut buf = BytesMut::new();
    for part in [&data[..split], &data[split..]] {
        buf.extend_from_slice(part);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    if frame.frame_type == FrameType::Data {
                        let _ = message_from_frame(frame);
                    }
                }
                Ok(None) => break,
                // the transport closes the connection on a bad frame
                Err(_) => return,
            }
        }
    }
}
