//! Fuzz target: the bytes a handshaken peer sends on a connection. The SFM codec splits them into
//! frames exactly as the transport's reader does (the input arrives in two reads, split where its
//! first byte says, to exercise partial frames); every DATA frame becomes a cell message (headers
//! and FOBS payload decoded); the whole input is also decoded as one frame. Each step must return
//! a value or a typed error: never a panic, never an allocation the input cannot justify.
#![no_main]

use bytes::{Bytes, BytesMut};
use fedrun_wire::{message_from_frame, Frame, FrameType, SfmCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
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
});
