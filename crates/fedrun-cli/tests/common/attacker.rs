//! The attacker's side of the harness for issue #10's regression tests (`tests/attacks.rs`): a
//! raw TCP connection to `fedrun server` that speaks NVFlare's SFM wire without credentials,
//! and builders for exactly the inputs of the table. Frames are built with fedrun-wire's
//! public [`Frame`] type, so the bytes on the wire are those an NVFlare peer would put there;
//! nothing here checks that a payload makes sense, since the point is that it need not.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedrun_cell::{header, CellMessage, Headers, MsgType, Payload, PayloadEncoding};
use fedrun_core::constants::{channel, fl_ctx_key, reserved_topic};
use fedrun_core::{Map, Shareable};
use fedrun_fobs::lobs::{MARKER_MAIN, SECTION_HEADER_LEN};
use fedrun_wire::{frame_from_message, Frame, HandshakeInfo, Prefix, PREFIX_LEN};

/// The largest frame [`Attacker::next_frame`] reads from the server (its answers are small).
const MAX_ANSWER_FRAME: usize = 64 << 20;

/// How a wait on an attacker connection ended.
#[derive(Debug)]
pub enum Answer {
    /// A frame came.
    Frame(Box<Frame>),
    /// The server closed the connection (EOF or reset).
    Closed,
    /// Nothing came before the deadline.
    Silent,
}

/// A raw connection to the server, speaking SFM frames without credentials.
pub struct Attacker {
    stream: TcpStream,
}

impl Attacker {
    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> io::Result<Attacker> {
        Ok(Attacker {
            stream: TcpStream::connect(addr)?,
        })
    }

    /// Makes a write that cannot proceed for `timeout` fail (a server that stops reading).
    pub fn set_write_timeout(&mut self, timeout: Duration) {
        self.stream
            .set_write_timeout(Some(timeout))
            .expect("a positive write timeout");
    }

    /// Writes `frame`, encoded.
    pub fn send(&mut self, frame: &Frame) -> io::Result<()> {
        let bytes = frame.encode().expect("the attack's frames are encodable");
        self.stream.write_all(&bytes)
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads into `buf` until it is full; `Err(Closed | Silent)` otherwise.
    fn read_full(&mut self, buf: &mut [u8], end: Instant) -> Result<(), Answer> {
        let mut got = 0;
        while got < buf.len() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Answer::Silent);
            }
            self.stream
                .set_read_timeout(Some(left))
                .expect("a positive read timeout");
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => return Err(Answer::Closed),
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(Answer::Closed),
            }
        }
        Ok(())
    }

    /// The next frame the server sends, or how the wait ended.
    pub fn next_frame(&mut self, deadline: Duration) -> Answer {
        let end = Instant::now() + deadline;
        let mut prefix = [0u8; PREFIX_LEN];
        if let Err(end) = self.read_full(&mut prefix, end) {
            return end;
        }
        let length = Prefix::parse(&prefix).map_or(0, |p| p.length as usize);
        assert!(
            (PREFIX_LEN..=MAX_ANSWER_FRAME).contains(&length),
            "the server sent a frame of {length} bytes"
        );
        let mut buf = vec![0u8; length];
        buf[..PREFIX_LEN].copy_from_slice(&prefix);
        if let Err(end) = self.read_full(&mut buf[PREFIX_LEN..], end) {
            return end;
        }
        Answer::Frame(Box::new(
            Frame::decode(Bytes::from(buf)).expect("the server sends valid frames"),
        ))
    }

    /// Reads (and discards) until the server closes the connection; false if it is still open
    /// after `deadline`.
    pub fn wait_closed(&mut self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            match self.read_full(&mut scratch[..1], end) {
                Ok(()) => {
                    // drain what is there without waiting for a full buffer
                    let _ = self.stream.read(&mut scratch);
                }
                Err(Answer::Closed) => return true,
                Err(_) => return false,
            }
        }
    }
}

/// A HELLO announcing the endpoint `name` (what a connecting NVFlare cell sends first).
pub fn hello(name: &str) -> Frame {
    let info = HandshakeInfo {
        endpoint_name: name.to_owned(),
        timestamp: Some(1.0),
        fqcn: Some(name.to_owned()),
    };
    let mut frame = Frame::hello(&info).expect("a handshake map is encodable");
    frame.sequence = 1;
    frame
}

/// The 16-byte prefix of a HELLO frame whose length field announces `length` bytes.
pub fn hello_prefix_announcing(length: u32) -> [u8; PREFIX_LEN] {
    let encoded = hello("attacker").encode().expect("encodable");
    let mut prefix = [0u8; PREFIX_LEN];
    prefix.copy_from_slice(&encoded[..PREFIX_LEN]);
    prefix[..4].copy_from_slice(&length.to_be_bytes());
    prefix
}

/// A request (DATA frame) from `origin` to `destination` on `channel`/`topic` whose FOBS
/// payload is `fobs`, as the bytes are (no check that they decode).
pub fn fobs_request(
    origin: &str,
    destination: &str,
    channel: &str,
    topic: &str,
    fobs: Bytes,
) -> Frame {
    let mut h = Headers::new();
    h.set_msg_type(MsgType::Req);
    h.set_channel(channel);
    h.set_topic(topic);
    h.set_origin(origin);
    h.set_destination(destination);
    h.set_req_id(format!("attack-{}", uuid::Uuid::new_v4()));
    h.set_reply_expected(true);
    h.set_payload_encoding(PayloadEncoding::Fobs);
    let mut frame = Frame::data(h, fobs);
    frame.sequence = 2;
    frame
}

/// A FOBS (LOBS) payload whose main section is a msgpack array header (`array32`) declaring
/// `declared` elements, followed by `nils` one-byte `nil`s.
pub fn nil_array(declared: u32, nils: usize) -> Bytes {
    let main_len = 5 + nils;
    let mut out = Vec::with_capacity(SECTION_HEADER_LEN + main_len);
    out.extend_from_slice(&[MARKER_MAIN, 0]);
    out.extend_from_slice(&(main_len as u64).to_be_bytes());
    out.push(0xdd);
    out.extend_from_slice(&declared.to_be_bytes());
    out.resize(out.len() + nils, 0xc0);
    Bytes::from(out)
}

/// NVFlare's `__end_run__` aux message as the server job `server_job` would send it to
/// `site_job` (a request on `aux_communication` whose `cn__origin` and `cn__from` claim the
/// server job, with the server's peer props for `job_id`): what a peer without credentials
/// forges to end a site's run.
pub fn forged_end_run(server_job: &str, site_job: &str, job_id: &str) -> Frame {
    let mut props = Map::new();
    props.insert(fl_ctx_key::RUN_NUM, job_id);
    props.insert(fl_ctx_key::IDENTITY_NAME, "server");
    let mut request = Shareable::new();
    request.set_peer_props(props);
    let mut h = Headers::new();
    h.set_msg_type(MsgType::Req);
    h.set_channel(channel::AUX_COMMUNICATION);
    h.set_topic(reserved_topic::END_RUN);
    h.set_origin(server_job);
    h.set_destination(site_job);
    h.insert(header::FROM, server_job);
    h.insert(header::TO, "server");
    h.set_req_id(format!("attack-{}", uuid::Uuid::new_v4()));
    h.set_reply_expected(true);
    let mut frame = frame_from_message(CellMessage {
        headers: h,
        payload: Payload::shareable(request),
    })
    .expect("a shareable is encodable");
    frame.sequence = 2;
    frame
}
