//! Receiving NVFlare streams over TCP: captured Python stream chunks replayed byte for byte to a
//! fedrun endpoint, and hand-built chunks for the edge cases (out of order, duplicates, wrong
//! sizes, limits). The fedrun side must acknowledge as Python does, hand the reassembled message
//! to its cell, and answer a streamed request with a streamed reply on `return_only`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use fedrun_cell::{
    header, request_handler, Cell, CellHandle, CellMessage, Fqcn, Headers, MsgType, Payload,
    RequestHandler,
};
use fedrun_core::{Shareable, Value};
use fedrun_wire::stream::{key, StreamMessage, STREAM_CHANNEL, TOPIC_ACK, TOPIC_DATA, TOPIC_ERROR};
use fedrun_wire::{
    frame_from_message, message_from_frame, Frame, FrameType, HandshakeInfo, SfmCodec,
    TcpTransport, WireConfig,
};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::codec::Framed;

const DEADLINE: Duration = Duration::from_secs(10);

type Raw = Framed<TcpStream, SfmCodec>;

fn fqcn(s: &str) -> Fqcn {
    Fqcn::new(s).unwrap()
}

/// Frame `idx` of a capture, as NVFlare wrote it.
fn vector(capture: &str, idx: usize) -> Bytes {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/nvflare-2.9")
        .join(format!("{capture}_vectors.txt"));
    let text = std::fs::read_to_string(path).unwrap();
    let line = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split('\t').next() == Some(&idx.to_string()))
        .unwrap_or_else(|| panic!("{capture} #{idx} not found"));
    Bytes::from(hex::decode(line.split('\t').nth(3).unwrap()).unwrap())
}

fn headers_of(bytes: &Bytes) -> Headers {
    Frame::decode(bytes.clone()).unwrap().headers.unwrap()
}

fn keys(h: &Headers) -> Vec<String> {
    h.iter().map(|(k, _)| k.to_owned()).collect()
}

/// A handler that reports each request and answers `{"answer": <topic>}`.
fn answering(seen: mpsc::Sender<CellMessage>) -> RequestHandler {
    request_handler(move |req: CellMessage| {
        let seen = seen.clone();
        async move {
            let mut reply = Shareable::new();
            reply.insert("answer", req.headers.topic().unwrap_or("").to_owned());
            let _ = seen.try_send(req);
            Ok(Some(CellMessage::new(reply)))
        }
    })
}

struct Endpoint {
    net: TcpTransport,
    addr: SocketAddr,
    cell: CellHandle,
    seen: mpsc::Receiver<CellMessage>,
}

/// A listener endpoint named `name` hosting cell `name` that answers on `channel`/*.
async fn endpoint(name: &str, channel: &str, config: WireConfig) -> Endpoint {
    let _ = env_logger::builder().is_test(true).try_init();
    let net = TcpTransport::new(fqcn(name), config);
    let addr = net.add_listener("tcp://127.0.0.1:0").await.unwrap();
    let cell = Cell::start(fqcn(name), net.clone()).unwrap();
    let (tx, seen) = mpsc::channel(16);
    cell.register_request_handler(channel, "*", answering(tx))
        .await
        .unwrap();
    Endpoint {
        net,
        addr,
        cell,
        seen,
    }
}

async fn raw_peer(addr: SocketAddr, name: &str) -> Raw {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut raw = Framed::new(stream, SfmCodec::new());
    let info = HandshakeInfo::now(&fqcn(name));
    raw.send(Frame::hello(&info).unwrap()).await.unwrap();
    let ready = next_frame(&mut raw).await;
    assert_eq!(ready.frame_type, FrameType::Ready);
    raw
}

async fn next_frame(raw: &mut Raw) -> Frame {
    timeout(DEADLINE, raw.next())
        .await
        .expect("no frame before the deadline")
        .expect("connection closed")
        .expect("bad frame")
}

/// The next cell message from the endpoint, with its frame's header map as sent (decoding the
/// message consumes `cn__payload_encoding`).
async fn next_data(raw: &mut Raw) -> (Headers, CellMessage) {
    loop {
        let f = next_frame(raw).await;
        if f.frame_type == FrameType::Data {
            let sent = f.headers.clone().unwrap();
            return (sent, message_from_frame(f).unwrap());
        }
    }
}

/// The next cell message from the endpoint.
async fn next_message(raw: &mut Raw) -> CellMessage {
    next_data(raw).await.1
}

fn sm_u64(h: &Headers, k: &str) -> u64 {
    h.get(k).and_then(Value::as_u64).unwrap()
}

fn sm_str<'a>(h: &'a Headers, k: &str) -> &'a str {
    h.get(k).and_then(Value::as_str).unwrap()
}

/// Replays NVFlare frames to `raw`.
async fn replay(raw: &mut Raw, frames: &[Bytes]) {
    for f in frames {
        raw.send(Frame::decode(f.clone()).unwrap()).await.unwrap();
    }
}

#[actix::test]
async fn captured_three_chunk_streamed_request_is_acked_like_python_and_answered_on_return_only() {
    let mut ep = endpoint("server", "server_command", WireConfig::default()).await;
    let mut raw = raw_peer(ep.addr, "site-1").await;
    // loopback #13-#15: site-1 streams submit_update to server, 5026 bytes in 3 chunks
    let frames = [
        vector("loopback", 13),
        vector("loopback", 14),
        vector("loopback", 15),
    ];
    let first = headers_of(&frames[0]);
    replay(&mut raw, &frames).await;

    let (sent, ack) = next_data(&mut raw).await;
    let python_ack = headers_of(&vector("loopback", 16));
    assert_eq!(keys(&sent), keys(&python_ack), "ACK key order");
    for k in [key::ID, key::DATA_TYPE, key::OFFSET, key::SEQ] {
        assert_eq!(ack.headers.get(k), python_ack.get(k), "{k}");
    }
    assert_eq!(ack.headers.destination(), Some("site-1"));
    assert!(ack.payload.is_none());

    let req = timeout(DEADLINE, ep.seen.recv()).await.unwrap().unwrap();
    assert_eq!(req.headers.channel(), Some("server_command"));
    assert_eq!(req.headers.topic(), Some("submit_update"));
    assert_eq!(req.headers.origin(), Some("site-1"));
    assert_eq!(req.headers.reply_expected(), Some(true));
    assert_eq!(req.headers.payload_len(), Some(5026));
    assert!(req.headers.iter().all(|(k, _)| !k.starts_with("sm__")));
    assert!(req.payload.as_shareable().is_some(), "blob decoded as FOBS");

    let reply = next_message(&mut raw).await;
    let h = &reply.headers;
    assert_eq!(h.channel(), Some(STREAM_CHANNEL));
    assert_eq!(h.topic(), Some(TOPIC_DATA));
    assert_eq!(sm_str(h, key::CHANNEL), "return_only");
    assert_eq!(sm_str(h, key::TOPIC), "server_command:submit_update");
    assert_eq!(
        sm_str(h, key::REQUEST_ID),
        sm_str(&first, key::REQUEST_ID),
        "same sm__ri"
    );
    assert_eq!(sm_str(h, key::PAYLOAD_ENCODING), "fobs");
    assert_eq!(h.return_code().unwrap().as_str(), "ok");
    assert_eq!(h.get(header::REQ_ID).and_then(Value::as_str), Some(""));
    assert_eq!(h.destination(), Some("site-1"));
    let StreamMessage::Chunk(c) = StreamMessage::parse(h).unwrap() else {
        panic!("not a chunk")
    };
    assert!(c.is_final && c.seq == 0 && c.offset == 0);
    let blob = reply.payload.as_bytes().unwrap().clone();
    assert_eq!(c.size, blob.len() as u64);
    let answer = fedrun_fobs::decode(blob).unwrap();
    assert_eq!(
        answer
            .value
            .as_shareable()
            .and_then(|s| s.get("answer"))
            .and_then(Value::as_str),
        Some("submit_update")
    );
    ep.cell.stop().await;
    ep.net.shutdown().await;
}

#[actix::test]
async fn captured_python_aux_stream_to_a_job_cell_gets_the_reply_the_foreign_cell_sent() {
    // foreign #18: server.job123 (via server) streams aux_communication/ping to site-1.job123
    let mut ep = endpoint("site-1.job123", "aux_communication", WireConfig::default()).await;
    let mut raw = raw_peer(ep.addr, "server").await;
    let request = vector("foreign", 18);
    replay(&mut raw, std::slice::from_ref(&request)).await;

    let (sent, ack) = next_data(&mut raw).await;
    // key order as Python's own ACKs (foreign #21), values as the foreign cell's ACK of this
    // very stream (foreign #19)
    assert_eq!(keys(&sent), keys(&headers_of(&vector("foreign", 21))));
    let foreign_ack = headers_of(&vector("foreign", 19));
    for k in [
        key::ID,
        key::DATA_TYPE,
        key::OFFSET,
        key::SEQ,
        header::DESTINATION,
        header::TO,
        header::ORIGIN,
    ] {
        assert_eq!(ack.headers.get(k), foreign_ack.get(k), "{k}");
    }

    let req = timeout(DEADLINE, ep.seen.recv()).await.unwrap().unwrap();
    assert_eq!(req.headers.origin(), Some("server.job123"));
    assert_eq!(req.headers.topic(), Some("ping"));

    let (sent, reply) = next_data(&mut raw).await;
    // what the spec-only foreign cell answered, and NVFlare accepted (foreign #20)
    let foreign_reply = headers_of(&vector("foreign", 20));
    assert_eq!(keys(&sent), keys(&foreign_reply), "reply chunk key order");
    for k in [
        key::REQUEST_ID,
        key::CHANNEL,
        key::TOPIC,
        key::PAYLOAD_ENCODING,
        key::DATA_TYPE,
        header::RETURN_CODE,
        header::REQ_ID,
        header::DESTINATION,
        header::TO,
        header::ORIGIN,
    ] {
        assert_eq!(reply.headers.get(k), foreign_reply.get(k), "{k}");
    }
    ep.cell.stop().await;
    ep.net.shutdown().await;
}

#[actix::test]
async fn captured_fire_and_forget_stream_is_delivered_without_reply_expected() {
    // loopback #41: a download confirmation streamed without sm__ri
    let mut ep = endpoint("server", "download_service__", WireConfig::default()).await;
    let mut raw = raw_peer(ep.addr, "site-1").await;
    replay(&mut raw, &[vector("loopback", 41)]).await;
    let ack = next_message(&mut raw).await;
    assert_eq!(ack.headers.topic(), Some(TOPIC_ACK));
    let req = timeout(DEADLINE, ep.seen.recv()).await.unwrap().unwrap();
    assert_eq!(req.headers.reply_expected(), Some(false));
    assert!(req.headers.get(header::REQ_ID).is_none());
    // no reply stream follows: the next thing the endpoint sends is the PONG to our PING
    raw.send(Frame::ping()).await.unwrap();
    assert_eq!(next_frame(&mut raw).await.frame_type, FrameType::Pong);
    ep.cell.stop().await;
    ep.net.shutdown().await;
}

/// One hand-built chunk of stream `id` from `site-2` to `server`, channel `test`/`echo`.
fn chunk(id: u64, seq: u64, offset: u64, size: u64, last: bool, data: &[u8]) -> Frame {
    let mut h = Headers::new();
    h.insert(key::REQUEST_ID, format!("ri-{id}"));
    h.insert(key::PAYLOAD_ENCODING, "bytes");
    h.insert(key::CHANNEL, "test");
    h.insert(key::TOPIC, "echo");
    h.insert(key::SIZE, size);
    h.insert(key::ID, id);
    h.insert(key::DATA_TYPE, if last { 2 } else { 1 });
    h.insert(key::SEQ, seq);
    h.insert(key::OFFSET, offset);
    h.set_channel(STREAM_CHANNEL);
    h.set_topic(TOPIC_DATA);
    h.set_origin("site-2");
    h.set_destination("server");
    h.set_msg_type(MsgType::Req);
    h.set_reply_expected(false);
    frame_from_message(CellMessage {
        headers: h,
        payload: Payload::Bytes(Bytes::copy_from_slice(data)),
    })
    .unwrap()
}

#[actix::test]
async fn out_of_order_and_duplicate_chunks_reassemble_once_and_duplicates_are_reacked() {
    let mut ep = endpoint("server", "test", WireConfig::default()).await;
    let mut raw = raw_peer(ep.addr, "site-2").await;
    raw.send(chunk(7, 1, 3, 6, true, b"def")).await.unwrap();
    raw.send(chunk(7, 0, 0, 6, false, b"abc")).await.unwrap();
    let ack = next_message(&mut raw).await;
    assert_eq!(ack.headers.topic(), Some(TOPIC_ACK));
    assert_eq!(
        (
            sm_u64(&ack.headers, key::OFFSET),
            sm_u64(&ack.headers, key::SEQ)
        ),
        (6, 1)
    );
    let req = timeout(DEADLINE, ep.seen.recv()).await.unwrap().unwrap();
    assert_eq!(req.payload, Payload::Bytes(Bytes::from_static(b"abcdef")));
    let reply = next_message(&mut raw).await;
    assert_eq!(sm_str(&reply.headers, key::REQUEST_ID), "ri-7");

    // a retry of the last chunk after completion: ACKed again, not delivered again
    raw.send(chunk(7, 1, 3, 6, true, b"def")).await.unwrap();
    let again = next_message(&mut raw).await;
    assert_eq!(again.headers.topic(), Some(TOPIC_ACK));
    assert_eq!(sm_u64(&again.headers, key::OFFSET), 6);
    assert!(ep.seen.try_recv().is_err(), "delivered twice");
    ep.cell.stop().await;
    ep.net.shutdown().await;
}

#[actix::test]
async fn size_mismatch_ends_the_stream_with_an_error_and_keeps_the_connection() {
    let mut ep = endpoint("server", "test", WireConfig::default()).await;
    let mut raw = raw_peer(ep.addr, "site-2").await;
    raw.send(chunk(8, 0, 0, 10, true, b"abc")).await.unwrap();
    let ack = next_message(&mut raw).await;
    assert_eq!(ack.headers.topic(), Some(TOPIC_ACK));
    let error = next_message(&mut raw).await;
    assert_eq!(error.headers.topic(), Some(TOPIC_ERROR));
    assert_eq!(sm_u64(&error.headers, key::DATA_TYPE), 6);
    assert_eq!(sm_str(&error.headers, key::ERROR_TYPE), "BlobSizeError");
    assert_eq!(sm_str(&error.headers, key::REQUEST_ID), "ri-8");
    // the same error also on sm__ACK, for older senders
    let copy = next_message(&mut raw).await;
    assert_eq!(copy.headers.topic(), Some(TOPIC_ACK));
    assert_eq!(sm_u64(&copy.headers, key::DATA_TYPE), 6);
    assert!(ep.seen.try_recv().is_err(), "a bad blob was delivered");
    raw.send(Frame::ping()).await.unwrap();
    assert_eq!(next_frame(&mut raw).await.frame_type, FrameType::Pong);
    ep.cell.stop().await;
    ep.net.shutdown().await;
}

#[actix::test]
async fn blob_above_the_limit_is_refused_before_it_is_buffered() {
    let config = WireConfig {
        max_stream_blob: 4,
        ..WireConfig::default()
    };
    let mut ep = endpoint("server", "test", config).await;
    let mut raw = raw_peer(ep.addr, "site-2").await;
    // announced too big
    raw.send(chunk(9, 0, 0, 100, false, b"ab")).await.unwrap();
    let error = next_message(&mut raw).await;
    assert_eq!(error.headers.topic(), Some(TOPIC_ERROR));
    assert_eq!(sm_str(&error.headers, key::ERROR_TYPE), "BlobSizeError");
    let _copy = next_message(&mut raw).await;
    // size unknown (0) but the bytes run past the limit
    raw.send(chunk(10, 0, 0, 0, false, b"abc")).await.unwrap();
    raw.send(chunk(10, 1, 3, 0, true, b"def")).await.unwrap();
    let error = next_message(&mut raw).await;
    assert_eq!(error.headers.topic(), Some(TOPIC_ERROR));
    assert_eq!(sm_u64(&error.headers, key::ID), 10);
    assert!(ep.seen.try_recv().is_err());
    ep.cell.stop().await;
    ep.net.shutdown().await;
}

#[actix::test]
async fn undecodable_stream_blob_is_a_stream_error_not_a_delivery() {
    let mut ep = endpoint("server", "test", WireConfig::default()).await;
    let mut raw = raw_peer(ep.addr, "site-2").await;
    let mut f = chunk(11, 0, 0, 4, true, b"junk");
    f.headers
        .as_mut()
        .unwrap()
        .insert(key::PAYLOAD_ENCODING, "fobs");
    raw.send(f).await.unwrap();
    let ack = next_message(&mut raw).await;
    assert_eq!(ack.headers.topic(), Some(TOPIC_ACK));
    let error = next_message(&mut raw).await;
    assert_eq!(error.headers.topic(), Some(TOPIC_ERROR));
    assert!(ep.seen.try_recv().is_err());
    ep.cell.stop().await;
    ep.net.shutdown().await;
}
