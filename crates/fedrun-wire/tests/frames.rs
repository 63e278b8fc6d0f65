//! Byte-exact check of the frame layer against every frame NVFlare 2.9 put on the wire in the
//! four captures (loopback cells, the spec-only foreign cell, the simulator job, the POC
//! production topology): each frame decodes, re-encodes to the same bytes, and its content
//! (handshake, heartbeat, cell message payload, stream headers) reads as the spec says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use fedrun_cell::{header, Payload};
use fedrun_wire::{
    message_from_frame, Frame, FrameType, HandshakeInfo, SfmCodec, StreamMessage, APP_ID_CELLNET,
    HANDSHAKE_STREAM_ID, HEARTBEAT_PAYLOAD,
};
use tokio_util::codec::Decoder;

/// The captures and how many frames each holds.
const CAPTURES: [(&str, usize); 4] = [("loopback", 49), ("foreign", 35), ("sim", 76), ("poc", 230)];
/// Frames in all captures.
const EXPECTED_FRAMES: usize = 390;
/// Lines that are not frames (the loopback capture's two TCP half-close markers `-`).
const EXPECTED_SKIPPED: usize = 2;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/nvflare-2.9")
}

struct Vector {
    file: &'static str,
    idx: String,
    bytes: Bytes,
}

/// The frames of one capture, and how many non-frame lines it has.
fn read_capture(name: &'static str) -> (Vec<Vector>, usize) {
    let path = data_dir().join(format!("{name}_vectors.txt"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut frames = Vec::new();
    let mut skipped = 0;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.splitn(5, '\t').collect();
        assert!(fields.len() >= 4, "{name}: malformed line {line:?}");
        let frame_hex = fields[3];
        let is_hex = !frame_hex.is_empty() && frame_hex.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hex {
            skipped += 1;
            continue;
        }
        frames.push(Vector {
            file: name,
            idx: fields[0].to_owned(),
            bytes: Bytes::from(hex::decode(frame_hex).unwrap()),
        });
    }
    (frames, skipped)
}

fn all_vectors() -> (Vec<Vector>, usize) {
    let mut all = Vec::new();
    let mut skipped = 0;
    for (name, expected) in CAPTURES {
        let (frames, s) = read_capture(name);
        assert_eq!(frames.len(), expected, "{name}: frame count");
        all.extend(frames);
        skipped += s;
    }
    (all, skipped)
}

#[derive(Default, Debug)]
struct Counts {
    frames: usize,
    data: usize,
    fobs: usize,
    bytes: usize,
    none: usize,
    handshakes: usize,
    heartbeats: usize,
    stream_messages: usize,
}

#[test]
fn every_captured_frame_decodes_and_reencodes_byte_exact() {
    let (vectors, skipped) = all_vectors();
    let mut counts = Counts::default();
    for v in &vectors {
        let what = format!("{} #{}", v.file, v.idx);
        let frame = Frame::decode(v.bytes.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
        let again = frame.encode().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(again, v.bytes, "{what}: re-encoded bytes differ");
        assert_eq!(frame.reserved, 0, "{what}");
        assert_eq!(frame.flags, 0, "{what}");
        counts.frames += 1;

        match frame.frame_type {
            FrameType::Hello | FrameType::Ready => {
                assert!(frame.headers.is_none(), "{what}: handshake has headers");
                assert_eq!(frame.stream_id, HANDSHAKE_STREAM_ID, "{what}");
                assert_eq!(frame.app_id, 0, "{what}");
                let info = HandshakeInfo::decode(&frame.payload).unwrap();
                info.endpoint()
                    .unwrap_or_else(|e| panic!("{what}: endpoint name: {e}"));
                counts.handshakes += 1;
            }
            FrameType::Ping | FrameType::Pong => {
                assert_eq!(&frame.payload[..], HEARTBEAT_PAYLOAD, "{what}");
                assert_eq!(frame.app_id, 0, "{what}");
                counts.heartbeats += 1;
            }
            FrameType::Data => {
                counts.data += 1;
                assert_eq!(frame.app_id, APP_ID_CELLNET, "{what}");
                let headers = frame.headers.clone().expect("DATA frame without headers");
                assert!(headers.msg_type().is_some(), "{what}: cn__msg_type");
                assert!(headers.origin().is_some(), "{what}: cn__origin");
                assert!(headers.destination().is_some(), "{what}: cn__destination");
                if headers.route().is_none() {
                    assert!(
                        headers.get(header::ROUTE).is_none(),
                        "{what}: malformed route"
                    );
                }
                let encoding = headers
                    .get(header::PAYLOAD_ENCODING)
                    .and_then(|v| v.as_str())
                    .map(str::to_owned);
                if let Some(len) = headers.payload_len() {
                    assert_eq!(len, frame.payload.len() as u64, "{what}: cn__payload_len");
                }
                let payload = frame.payload.clone();
                let msg = message_from_frame(frame)
                    .unwrap_or_else(|e| panic!("{what}: payload decode: {e}"));
                match encoding.as_deref() {
                    Some("fobs") => {
                        assert!(matches!(msg.payload, Payload::Value(_)), "{what}");
                        // the FOBS codec reproduces NVFlare's payload bytes too
                        let decoded = fedrun_fobs::decode(payload.clone()).unwrap();
                        let reencoded = fedrun_fobs::encode_payload(
                            &decoded,
                            &fedrun_fobs::EncodeOptions::default(),
                        )
                        .unwrap();
                        assert_eq!(reencoded, payload, "{what}: FOBS re-encode differs");
                        counts.fobs += 1;
                    }
                    Some("bytes") => {
                        assert_eq!(msg.payload, Payload::Bytes(payload), "{what}");
                        counts.bytes += 1;
                    }
                    Some("none") => {
                        assert_eq!(msg.payload, Payload::None, "{what}");
                        counts.none += 1;
                    }
                    other => panic!("{what}: unexpected payload encoding {other:?}"),
                }
                if msg.headers.channel() == Some(fedrun_wire::stream::STREAM_CHANNEL) {
                    StreamMessage::parse(&msg.headers)
                        .unwrap_or_else(|e| panic!("{what}: stream headers: {e}"));
                    counts.stream_messages += 1;
                }
            }
            other => panic!("{what}: NVFlare does not send {other} frames"),
        }
    }
    println!("frames checked: {counts:?}, non-frame lines skipped: {skipped}");
    assert_eq!(counts.frames, EXPECTED_FRAMES, "total frame count");
    assert_eq!(skipped, EXPECTED_SKIPPED, "skipped line count");
    assert_eq!(
        counts.data + counts.handshakes + counts.heartbeats,
        counts.frames
    );
    assert_eq!(counts.fobs + counts.bytes + counts.none, counts.data);
    assert!(counts.fobs > 0 && counts.stream_messages > 0 && counts.heartbeats > 0);
}

/// One direction of a capture as a TCP byte stream, cut into pieces of `piece` bytes, gives
/// back exactly the captured frames through the codec.
#[test]
fn codec_cuts_a_byte_stream_into_the_captured_frames_whatever_the_read_sizes() {
    let (vectors, _) = all_vectors();
    let mut stream = Vec::new();
    for v in &vectors {
        stream.extend_from_slice(&v.bytes);
    }
    for piece in [1usize, 7, 16, 1000, 65536] {
        let mut codec = SfmCodec::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in stream.chunks(piece) {
            buf.extend_from_slice(chunk);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                got.push(frame);
            }
        }
        assert!(buf.is_empty(), "piece {piece}: bytes left over");
        assert_eq!(got.len(), vectors.len(), "piece {piece}: frame count");
        for (frame, v) in got.iter().zip(&vectors) {
            assert_eq!(
                frame.encode().unwrap(),
                v.bytes,
                "piece {piece}: {} #{}",
                v.file,
                v.idx
            );
        }
    }
}
