//! Fuzz target: the first bytes an unauthenticated peer sends. As the transport's accept path
//! does, the handshake codec (limited to `HANDSHAKE_MAX_FRAME_SIZE`) reads the first frame, which
//! must be a HELLO whose payload names a valid endpoint; after it the limit is raised and the
//! frames that follow are read. Every step must return a value or a typed error, and the whole
//! target may hold no more than `DECODE_MEMORY_FACTOR` × the input's length + 2 MiB (checked by
//! a counting global allocator).
#![no_main]

use std::alloc::System;

use bytes::BytesMut;
use fedrun_wire::{
    message_from_frame, FrameType, HandshakeInfo, SfmCodec, HANDSHAKE_MAX_FRAME_SIZE,
};
use libfuzzer_sys::fuzz_target;
use peakmem_alloc::{PeakMemAlloc, PeakMemAllocTrait, INSTRUMENTED_SYSTEM};
use tokio_util::codec::Decoder;

#[global_allocator]
static HEAP: &PeakMemAlloc<System> = &INSTRUMENTED_SYSTEM;

fuzz_target!(|data: &[u8]| {
    HEAP.reset_peak_memory();
    handshake(data);
    let peak = HEAP.get_peak_memory();
    let bound = fedrun_fobs::DECODE_MEMORY_FACTOR * data.len() + (2 << 20);
    assert!(
        peak <= bound,
        "held {peak} bytes for {} bytes of input (bound {bound})",
        data.len()
    );
});

fn handshake(data: &[u8]) {
    let mut codec = SfmCodec::with_max_frame_size(HANDSHAKE_MAX_FRAME_SIZE);
    let mut buf = BytesMut::from(data);
    let Ok(Some(first)) = codec.decode(&mut buf) else {
        return;
    };
    if first.frame_type != FrameType::Hello {
        return;
    }
    let Ok(info) = HandshakeInfo::decode(&first.payload) else {
        return;
    };
    if info.endpoint().is_err() {
        return;
    }
    codec.set_max_frame_size(fedrun_wire::MAX_FRAME_SIZE);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        if frame.frame_type == FrameType::Data {
            let _ = message_from_frame(frame);
        }
    }
}
