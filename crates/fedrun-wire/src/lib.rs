//! NVFlare's CellNet wire for fedrun: SFM frames over TCP, byte-exact with NVFlare 2.9.
//!
//! A fedrun [`fedrun_cell::Cell`] talks to other cells through a
//! [`fedrun_cell::Transport`]. Inside one process that is the in-process network; to talk to
//! NVFlare's Python processes (or to another fedrun process) it must be NVFlare's own wire:
//! SFM frames over TCP, plain or TLS. This crate provides it, layer by layer:
//!
//! - [`frame`]: the [`Frame`] (16-byte prefix, msgpack header map, payload), its exact byte
//!   form, the handshake payload [`HandshakeInfo`] and the heartbeat payload.
//! - [`codec`]: [`SfmCodec`], the `tokio_util` decoder/encoder that cuts a TCP byte stream
//!   into frames with bounded buffering and zero-copy payloads.
//! - [`message`]: a [`fedrun_cell::CellMessage`] ↔ one DATA frame, payloads encoded per
//!   `cn__payload_encoding` ([`encode_payload`], [`decode_payload`]).
//! - [`stream`]: the typed `sm__*` headers of NVFlare's streaming layer ([`StreamMessage`]).
//! - `stream_rx` (internal): reassembly and acknowledgement of incoming NVFlare streams, and
//!   the streamed reply (on `return_only`) to a streamed request.
//! - [`stream_tx`]: sending NVFlare streams (chunks, windowed ACKs, streamed requests and the
//!   matching of their streamed replies), configured by [`StreamSendConfig`].
//! - [`transport`]: [`TcpTransport`], the [`fedrun_cell::Transport`] that runs cells over
//!   TCP: listeners and reconnecting connectors, HELLO/READY, PING/PONG, NVFlare's route rule,
//!   relaying, one bounded writer queue per connection.
//! - [`limits`]: what a peer may make this endpoint hold: endpoint-name rules, bounded log
//!   prefixes of peer-supplied strings ([`limits::Bounded`]), the descriptor-derived connection
//!   limit. `inbound` (internal) enforces the connection slots, the silent-connection policy and
//!   the per-connection in-flight budget.
//! - [`tls`]: TLS and mTLS (`stcp://`, NVFlare's `secure_train`): credentials from a startup
//!   kit, [`tls::TlsListener`] and [`tls::TlsConnector`] for
//!   [`TcpTransport::add_tls_listener`] and [`TcpTransport::add_tls_connector`], and the mTLS
//!   binding of registered names to certificate CNs.
//! - [`error`]: [`WireError`], one typed variant per way a peer or a socket can fail.
//!
//! # Relaying
//!
//! An endpoint passes on, as NVFlare's cells do, every message addressed to a
//! cell it does not host: that is how fedrun's `server` endpoint (NVFlare's server root cell)
//! carries traffic between client jobs such as `site-1.J` and `site-2.J`, which are connected
//! only to it. The next hop is NVFlare's route pick (a peer named as the destination, else the
//! longest prefix of the destination that is a peer, else `server`, else the parent); the
//! message leaves with `cn__from` = this endpoint, `cn__to` = the next hop and this endpoint
//! appended to `cn__route`, its payload neither decoded nor copied. Streams are relayed chunk
//! by chunk (chunks, ACKs and errors are ordinary cell messages addressed to the logical
//! destination and origin): the relay never reassembles them, and flow control runs end to end.
//! A next hop already on the route, or the peer the message came from, is refused as a loop
//! (unless it is the destination itself) and logged. What cannot be relayed is answered like
//! an unreachable cell: a request that expects a reply gets a `return` message (`comm_error`,
//! "cannot forward", `cant_forward`), a stream chunk an `sm__ERROR` so that its sender stops at
//! once; anything else is dropped. [`WireConfig::forwarding`] (on by default) turns relaying
//! off for a pure leaf.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use fedrun_wire::{Frame, FrameType};
//!
//! // loopback vector #0: site-1's HELLO
//! let hello = "0000004500000400000000000001000183ad656e64706f696e745f6e616d65a6736974652d31\
//!              a974696d657374616d70cb41dac31632d719aca46671636ea6736974652d31";
//! let bytes = Bytes::from(hex::decode(hello).unwrap());
//! let frame = Frame::decode(bytes.clone()).unwrap();
//! assert_eq!(frame.frame_type, FrameType::Hello);
//! let info = fedrun_wire::HandshakeInfo::decode(&frame.payload).unwrap();
//! assert_eq!(info.endpoint_name, "site-1");
//! assert_eq!(frame.encode().unwrap(), bytes);
//! ```

mod body;
pub mod codec;
pub mod error;
pub mod frame;
mod inbound;
pub mod limits;
pub mod message;
pub mod stream;
mod stream_rx;
pub mod stream_tx;
pub mod tls;
mod tls_cert;
mod tls_conn;
pub mod transport;

pub use codec::{SfmCodec, READ_RESERVE_LIMIT};
pub use error::WireError;
pub use frame::{
    decode_headers, encode_headers, flags, Frame, FrameType, HandshakeInfo, Prefix, APP_ID_CELLNET,
    HANDSHAKE_STREAM_ID, HEARTBEAT_PAYLOAD, MAX_FRAME_SIZE, PREFIX_LEN, STREAM_ID_BASE,
};
pub use message::{decode_payload, encode_payload, frame_from_message, message_from_frame};
pub use stream::StreamMessage;
pub use stream_rx::{
    RECEIVER_ACK_INTERVAL, SEND_CHUNK_SIZE, SEND_WINDOW_SIZE, STREAM_REQ_ID_PREFIX,
};
pub use stream_tx::{
    StreamChannels, StreamSendConfig, NVFLARE_UNSTREAMED_CHANNELS, SENDER_ACK_INTERVAL,
    STREAM_ACK_TIMEOUT, STREAM_THRESHOLD, STREAM_THRESHOLD_HEADROOM,
};
pub use transport::{
    TcpTransport, TcpUrl, WireConfig, BYE_TOPIC, CELLNET_CHANNEL, HANDSHAKE_MAX_FRAME_SIZE,
};
