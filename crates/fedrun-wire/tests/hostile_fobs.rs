//! Issue #10 row 1 over a real socket: after its HELLO, a peer sends a DATA frame to a registered
//! cell whose FOBS payload is a msgpack array header followed by megabytes of one-byte `nil`s
//! (before the fix the decoder reserved 48 bytes per input byte: 8 Mi nils took +392 MiB, and a
//! 600 MiB payload aborted the server). The endpoint must stay up, refuse the message (closing
//! that connection or answering an error), hold no more heap than a small multiple of the bytes
//! on the wire, and go on serving other connections.
//!
//! A counting global allocator measures the peak of live heap bytes in the whole process (both
//! endpoints and the scripted peer) from just before the hostile bytes are written until the
//! endpoint has refused them. The tests take turns (one lock), so that one test's allocations are
//! not measured by another.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use fedrun_cell::{
    header, request_handler, Cell, CellHandle, CellMessage, Fqcn, Headers, MsgType, Payload,
    SendRequest,
};
use fedrun_core::{CellReturnCode, Shareable};
use fedrun_wire::{Frame, FrameType, HandshakeInfo, SfmCodec, TcpTransport, WireConfig};
use futures::{SinkExt, StreamExt};
use peakmem_alloc::{PeakMemAlloc, PeakMemAllocTrait, INSTRUMENTED_SYSTEM};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::codec::Framed;

#[global_allocator]
static HEAP: &PeakMemAlloc<System> = &INSTRUMENTED_SYSTEM;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Upper bound for any single wait in these tests.
const DEADLINE: Duration = Duration::from_secs(30);

const MIB: usize = 1024 * 1024;

fn fqcn(s: &str) -> Fqcn {
    Fqcn::new(s).unwrap()
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// A `server` listener with an echo handler on `test/*`, and `site-1.job1` connected to it.
struct Pair {
    server_net: TcpTransport,
    addr: SocketAddr,
    server: CellHandle,
    job_net: TcpTransport,
    job: CellHandle,
}

impl Pair {
    async fn start() -> Pair {
        init_log();
        let server_net = TcpTransport::new(Fqcn::SERVER, WireConfig::default());
        let addr = server_net.add_listener("tcp://127.0.0.1:0").await.unwrap();
        let server = Cell::start(Fqcn::SERVER, server_net.clone()).unwrap();
        let echo = request_handler(|req: CellMessage| async move {
            Ok(Some(CellMessage::new(req.payload.clone())))
        });
        server
            .register_request_handler("test", "*", echo)
            .await
            .unwrap();
        let job_net = TcpTransport::new(fqcn("site-1.job1"), WireConfig::default());
        job_net.add_connector(&format!("tcp://{addr}")).unwrap();
        assert!(job_net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
        let job = Cell::start(fqcn("site-1.job1"), job_net.clone()).unwrap();
        Pair {
            server_net,
            addr,
            server,
            job_net,
            job,
        }
    }

    /// The legitimate client is still served, and a new connection is still accepted.
    async fn still_serves(&self) {
        let mut s = Shareable::new();
        s.insert("round", 1);
        let req = SendRequest::new(
            "test",
            "echo",
            Fqcn::SERVER,
            CellMessage::new(Payload::shareable(s)),
            DEADLINE,
        );
        let reply = self.job.send_request(req).await.unwrap();
        assert_eq!(reply.return_code(), CellReturnCode::Ok);
        let mut again = raw_connect(self.addr).await;
        assert_eq!(
            raw_hello(&mut again, "site-9").await.frame_type,
            FrameType::Ready
        );
    }

    async fn shutdown(self) {
        self.job.stop().await;
        self.server.stop().await;
        self.job_net.shutdown().await;
        self.server_net.shutdown().await;
    }
}

/// A scripted peer on a raw socket.
type Raw = Framed<TcpStream, SfmCodec>;

async fn raw_connect(addr: SocketAddr) -> Raw {
    let stream = TcpStream::connect(addr).await.unwrap();
    Framed::new(stream, SfmCodec::new())
}

/// Sends HELLO as `name` and returns the READY.
async fn raw_hello(raw: &mut Raw, name: &str) -> Frame {
    let info = HandshakeInfo {
        endpoint_name: name.to_owned(),
        timestamp: Some(1.0),
        fqcn: Some(name.to_owned()),
    };
    let mut hello = Frame::hello(&info).unwrap();
    hello.sequence = 1;
    raw.send(hello).await.unwrap();
    timeout(DEADLINE, raw.next())
        .await
        .expect("no READY before the deadline")
        .expect("connection closed")
        .expect("bad frame")
}

/// Waits until the endpoint closes the connection or answers with a return code other than OK.
async fn expect_refused(raw: &mut Raw) {
    let refused = timeout(DEADLINE, async {
        loop {
            match raw.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(frame)) => {
                    let code = frame
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(header::RETURN_CODE))
                        .and_then(|v| v.as_str().map(str::to_owned));
                    if code.is_some_and(|c| c != "ok") {
                        return;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "the hostile message was neither refused nor its connection closed"
    );
}

/// A FOBS request from `origin` to the server's echo handler, with `payload` as its body.
fn data_frame(origin: &str, payload: Bytes) -> Frame {
    let mut h = Headers::new();
    h.set_msg_type(MsgType::Req);
    h.set_channel("test");
    h.set_topic("echo");
    h.set_origin(origin);
    h.set_destination("server");
    h.set_req_id("hostile-1");
    h.set_reply_expected(true);
    h.insert(header::PAYLOAD_ENCODING, "fobs");
    let mut frame = Frame::data(h, payload);
    frame.sequence = 2;
    frame
}

/// A LOBS container whose main section is an array header declaring `declared` elements,
/// followed by `nils` one-byte nils.
fn nil_array_payload(declared: u32, nils: usize) -> Bytes {
    let main_len = 5 + nils;
    let mut out = Vec::with_capacity(10 + main_len);
    out.extend_from_slice(&[100, 0]);
    out.extend_from_slice(&(main_len as u64).to_be_bytes());
    out.push(0xdd);
    out.extend_from_slice(&declared.to_be_bytes());
    out.resize(out.len() + nils, 0xc0);
    Bytes::from(out)
}

/// Sends `payload` as site-2 after its HELLO and returns the peak heap from the send until the
/// endpoint refused it.
async fn peak_while_refusing(p: &Pair, name: &str, payload: Bytes) -> usize {
    let mut raw = raw_connect(p.addr).await;
    raw_hello(&mut raw, name).await;
    assert!(p.server_net.wait_for_peer(&fqcn(name), DEADLINE).await);
    // kept alive while measuring: freeing it would hide as much of what the endpoint holds
    let keep = payload.clone();
    let frame = data_frame(name, payload);
    HEAP.reset_peak_memory();
    raw.send(frame).await.unwrap();
    expect_refused(&mut raw).await;
    let peak = HEAP.get_peak_memory();
    drop(keep);
    peak
}

#[actix::test]
async fn an_array_of_8_mi_nils_after_hello_is_refused_within_6_times_its_size_and_the_endpoint_serves_on(
) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let p = Pair::start().await;
    let nils = 8 * MIB;
    // what the bytes on the wire can cost: the peer's write buffer, the endpoint's read buffer
    // (grown with the bytes received) and the refused decode, which reserves nothing
    let bound = 6 * nils;
    // the input: the count declared exactly
    let peak = peak_while_refusing(&p, "site-2", nil_array_payload(nils as u32, nils)).await;
    eprintln!("8 Mi nils, declared: peak heap {peak} bytes");
    assert!(peak < bound, "8 Mi nils held {peak} bytes (bound {bound})");
    // a count of 2^31 over the same nils
    let peak = peak_while_refusing(&p, "site-3", nil_array_payload(1 << 31, nils)).await;
    eprintln!("2^31 declared over 8 Mi nils: peak heap {peak} bytes");
    assert!(
        peak < bound,
        "2^31 declared held {peak} bytes (bound {bound})"
    );
    p.still_serves().await;
    p.shutdown().await;
}

#[actix::test]
async fn a_600_mi_array_whose_body_is_absent_costs_only_the_bytes_that_came() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let p = Pair::start().await;
    // the payload declares 600 Mi elements and carries 1 MiB of them
    let peak = peak_while_refusing(&p, "site-4", nil_array_payload(600 * MIB as u32, MIB)).await;
    eprintln!("600 Mi declared over 1 MiB: peak heap {peak} bytes");
    assert!(peak < 8 * MIB, "600 Mi declared held {peak} bytes");

    // the frame itself announces a 600 MiB payload, 1 MiB of it arrives, then the peer stops
    // sending: the endpoint buffers what came, and drops it when the peer goes away
    let mut raw = raw_connect(p.addr).await;
    raw_hello(&mut raw, "site-5").await;
    assert!(p.server_net.wait_for_peer(&fqcn("site-5"), DEADLINE).await);
    let mut wire = data_frame("site-5", nil_array_payload(600 * MIB as u32, MIB))
        .encode()
        .unwrap()
        .to_vec();
    let announced = (wire.len() + 600 * MIB) as u32;
    wire[..4].copy_from_slice(&announced.to_be_bytes());
    HEAP.reset_peak_memory();
    let stream = raw.get_mut();
    stream.write_all(&wire).await.unwrap();
    stream.shutdown().await.unwrap();
    assert!(
        p.server_net
            .wait_for_peer_gone(&fqcn("site-5"), DEADLINE)
            .await,
        "the endpoint kept the half-sent frame's connection"
    );
    let peak = HEAP.get_peak_memory();
    eprintln!("600 MiB frame, 1 MiB sent: peak heap {peak} bytes");
    assert!(
        peak < 8 * MIB,
        "a 600 MiB frame with 1 MiB sent held {peak} bytes"
    );
    p.still_serves().await;
    p.shutdown().await;
}
