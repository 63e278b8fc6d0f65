//! Fuzz target: the first bytes an unauthenticated peer sends. As the transport's accept path
//! does, the handshake codec (limited to `HANDSHAKE_MAX_FRAME_SIZE`) reads the first frame, which
//! must be a HELLO whose payload names a valid endpoint; after it the limit is raised and the
//! frames that follow are read. Every step must return a value or a typed error.
#![no_main]

use bytes::BytesMut;
use fedrun_wire::{
    message_from_frame, FrameType, HandshakeInfo, SfmCodec, HANDSHAKE_MAX_FRAME_SIZE,
};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
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
});
