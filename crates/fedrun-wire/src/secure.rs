//! Secure messages on the wire (NVFlare 2.9's `cn__secure`): what the transport does around
//! the cipher of `fedrun-secure`.
//!
//! A module of `transport` (it extends the endpoint's `Inner` with a few methods), kept in its
//! own file so that the transport only carries the hooks:
//!
//! - **sending** (`seal_body`, `chunk_sealer`): a message from a local cell with `cn__secure`
//!   true leaves with its encoded payload replaced by an envelope for its destination cell,
//!   `cn__clear_payload_len` (the cleartext size) and `cn__encrypted` true; the
//!   `cn__payload_encoding` stays the cleartext's. A streamed message is sealed chunk by chunk
//!   (each `sm__DATA` payload its own envelope; ACKs and errors stay plain); a secure request
//!   with an object payload on a channel NVFlare streams (`aux_communication`, ...) is always
//!   streamed, as NVFlare sends it (see `must_stream`). The destination's
//!   certificate comes from a key exchange (channel `credential_manager`, topic
//!   `key_exchange`) the first time. Without credentials ([`WireConfig::secure`]) the send
//!   fails with `authentication_error` and a log line: a secure message never leaves in clear.
//! - **receiving** (`open_incoming`, in `secure_rx.rs`): a key-exchange request is answered at once (NVFlare
//!   waits up to an hour for the answer), a key-exchange reply wakes the send that asked, and
//!   an encrypted frame is opened before it is decoded. A frame from an origin whose
//!   certificate is not known yet is held (bounded) while this endpoint asks for it, then
//!   opened in arrival order. A frame that does not open is dropped with a log line; a request
//!   among them is answered with `authentication_error` so that its sender does not wait.
//!
//! Relayed frames are never touched: a relay passes envelopes on as it passes any payload.
//!
//! [`WireConfig::secure`]: super::WireConfig::secure

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use fedrun_cell::{header, CellMessage, Fqcn, Headers, MsgType, Payload, PayloadEncoding};
use fedrun_core::{Map, Value};
use fedrun_secure::{
    CellCipher, CellCredentials, CERT_CA_CONTENT, CERT_CONTENT, CERT_ERROR, KEY_EXCHANGE_CHANNEL,
    KEY_EXCHANGE_TOPIC,
};
use tokio::sync::{mpsc, oneshot};

use super::{Inner, Outbound};

// the receiving half
#[path = "secure_rx.rs"]
mod rx;
use crate::body::Body;
use crate::error::WireError;
use crate::frame::{epoch_secs, Frame};
use crate::message::frame_from_message;

/// How long a key exchange may take before the secure send (or the held frames) fail.
/// NVFlare waits for its cell's `max_timeout` (an hour); a fedrun cell gives up sooner and
/// says so.
pub const KEY_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Origins whose frames may be held at once while their certificates are asked for.
const MAX_HELD_ORIGINS: usize = 16;
/// Bytes of frames held at once while certificates are asked for.
const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;
/// Key exchanges this endpoint may be waiting for at once.
const MAX_EXCHANGES: usize = 1024;

/// A frame held until its origin's certificate is known.
struct Held {
    peer: Fqcn,
    frame: Frame,
    tx: mpsc::Sender<Outbound>,
}

#[derive(Default)]
struct HeldFrames {
    by_origin: HashMap<String, VecDeque<Held>>,
    bytes: usize,
}

/// The endpoint's secure-message state: the cipher (if credentials are configured), the key
/// exchanges in flight, and the frames waiting for a certificate.
pub(crate) struct SecureLink {
    cipher: Option<Arc<CellCipher>>,
    endpoint: Weak<Inner>,
    waiters: Mutex<HashMap<String, oneshot::Sender<CellMessage>>>,
    held: Mutex<HeldFrames>,
}

impl SecureLink {
    pub(crate) fn new(creds: Option<Arc<CellCredentials>>, endpoint: Weak<Inner>) -> SecureLink {
        SecureLink {
            cipher: creds.map(|c| Arc::new(CellCipher::new(c))),
            endpoint,
            waiters: Mutex::new(HashMap::new()),
            held: Mutex::new(HeldFrames::default()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HeldFrames> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<CellMessage>>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Seals stream chunks for one receiver (its certificate already known).
pub(crate) struct Sealer {
    cipher: Arc<CellCipher>,
    target: String,
}

impl Sealer {
    /// Replaces a chunk's payload by its envelope and marks the chunk encrypted.
    pub(crate) fn seal(&self, chunk: &mut CellMessage) -> Result<(), WireError> {
        let clear = chunk.payload.as_bytes().cloned().unwrap_or_default();
        let env = self
            .cipher
            .encrypt_for(&self.target, &clear)
            .map_err(|source| WireError::Secure {
                peer: self.target.clone(),
                source,
            })?;
        mark_encrypted(&mut chunk.headers, clear.len());
        chunk.payload = Payload::Bytes(Bytes::from(env));
        Ok(())
    }
}

fn mark_encrypted(h: &mut Headers, clear_len: usize) {
    h.set_secure(true);
    h.insert(header::CLEAR_PAYLOAD_LEN, clear_len as u64);
    h.insert(header::ENCRYPTED, true);
}

fn wants_seal(h: &Headers) -> bool {
    h.secure() == Some(true) && h.get(header::ENCRYPTED).and_then(Value::as_bool) != Some(true)
}

/// Whether a message must leave as a stream on a channel NVFlare streams, whatever its size:
/// a secure message with an object (FOBS) payload. NVFlare 2.9 cannot seal an object payload
/// on its unstreamed path, so its handler's object reply to a secure unstreamed request would
/// never come back; streamed, request and reply are sealed chunk by chunk.
pub(super) fn must_stream(h: &Headers, encoding: PayloadEncoding) -> bool {
    wants_seal(h) && encoding == PayloadEncoding::Fobs
}

fn is_key_exchange(h: &Headers) -> bool {
    h.channel() == Some(KEY_EXCHANGE_CHANNEL) && h.topic() == Some(KEY_EXCHANGE_TOPIC)
}

fn describe(h: &Headers) -> String {
    format!(
        "{}/{} from {} for {}",
        h.channel().unwrap_or(""),
        h.topic().unwrap_or(""),
        h.origin().unwrap_or("?"),
        h.destination().unwrap_or("?")
    )
}

fn field<'a>(payload: &'a Payload, key: &str) -> Option<&'a Value> {
    payload.as_value()?.as_map()?.get(key)
}

impl Inner {
    fn cipher_or_refuse(&self, h: &Headers) -> Result<Arc<CellCipher>, WireError> {
        self.secure.cipher.clone().ok_or_else(|| {
            log::warn!(
                "endpoint {}: secure message {} not sent: no credentials for secure messages \
                 are configured (WireConfig::secure); a secure message is never sent in clear",
                self.own,
                describe(h)
            );
            WireError::SecureUnavailable
        })
    }

    /// The core path: seals the encoded payload of a secure message for `dest` (after a key
    /// exchange if its certificate is unknown). Other messages pass unchanged.
    pub(super) async fn seal_body(
        &self,
        h: &mut Headers,
        body: Body,
        dest: &Fqcn,
    ) -> Result<Body, WireError> {
        if !wants_seal(h) {
            return Ok(body);
        }
        let cipher = self.cipher_or_refuse(h)?;
        self.ensure_cert(&cipher, h.origin().unwrap_or(self.own.as_str()), dest)
            .await?;
        let clear = body.to_bytes();
        let env = cipher
            .encrypt_for(dest.as_str(), &clear)
            .map_err(|source| WireError::Secure {
                peer: dest.to_string(),
                source,
            })?;
        mark_encrypted(h, clear.len());
        Ok(Body::from(Bytes::from(env)))
    }

    /// The stream path: a [`Sealer`] for the chunks of a secure message to `dest` (after a key
    /// exchange if needed), or `None` for a message that is not secure.
    pub(super) async fn chunk_sealer(
        &self,
        h: &Headers,
        from: &str,
        dest: &Fqcn,
    ) -> Result<Option<Sealer>, WireError> {
        if !wants_seal(h) {
            return Ok(None);
        }
        let cipher = self.cipher_or_refuse(h)?;
        self.ensure_cert(&cipher, from, dest).await?;
        Ok(Some(Sealer {
            cipher,
            target: dest.to_string(),
        }))
    }

    /// Makes sure `target`'s certificate is known: asks `target` for it (as the local cell
    /// `from`) if not, and checks and keeps the answer.
    async fn ensure_cert(
        &self,
        cipher: &CellCipher,
        from: &str,
        target: &Fqcn,
    ) -> Result<(), WireError> {
        if cipher.peer(target.as_str()).is_some() {
            return Ok(());
        }
        let fail = |reason: String| {
            log::warn!(
                "endpoint {}: key exchange with {target} failed: {reason}",
                self.own
            );
            WireError::KeyExchange {
                target: target.to_string(),
                reason,
            }
        };
        let (peer, link) = self
            .pick_link(target)
            .ok_or_else(|| WireError::NoRoute(target.to_string()))?;
        let req_id = uuid::Uuid::new_v4().to_string();
        let now = epoch_secs();
        let mut h = Headers::new();
        h.set_topic(KEY_EXCHANGE_TOPIC);
        h.set_channel(KEY_EXCHANGE_CHANNEL);
        h.set_destination(target.as_str());
        h.set_req_id(req_id.as_str());
        h.set_reply_expected(true);
        h.set_secure(false);
        h.set_optional(false);
        h.set_from(from);
        h.set_origin(from);
        h.set_msg_type(MsgType::Req);
        h.set_route([(from, now)]);
        self.stamp_hop(&mut h, &peer);
        h.set_send_time(now);
        let payload = cert_payload(cipher);
        let frame = frame_from_message(CellMessage {
            headers: h,
            payload,
        })?;
        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut waiters = self.secure.waiters();
            if waiters.len() >= MAX_EXCHANGES {
                return Err(fail("too many key exchanges in flight".into()));
            }
            waiters.insert(req_id.clone(), reply_tx);
        }
        let sent = self.queue_and_wait(&peer, &link, frame, None).await;
        let reply = match sent {
            Ok(()) => tokio::time::timeout(KEY_EXCHANGE_TIMEOUT, reply_rx).await,
            Err(rc) => {
                self.secure.waiters().remove(&req_id);
                return Err(fail(format!("request not sent ({rc})")));
            }
        };
        self.secure.waiters().remove(&req_id);
        let reply = match reply {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(fail("endpoint closing".into())),
            Err(_) => return Err(fail(format!("no answer within {KEY_EXCHANGE_TIMEOUT:?}"))),
        };
        let rc = reply.headers.return_code();
        if !rc.as_ref().is_some_and(|c| c.is_ok()) {
            return Err(fail(format!(
                "answered {} ({})",
                rc.map_or("no return code".to_owned(), |c| c.as_str().to_owned()),
                reply.headers.error().unwrap_or("")
            )));
        }
        if let Some(e) = field(&reply.payload, CERT_ERROR) {
            return Err(fail(format!(
                "peer has no certificate: {}",
                e.as_str().unwrap_or("?")
            )));
        }
        let pem = field(&reply.payload, CERT_CONTENT)
            .and_then(Value::as_bin)
            .ok_or_else(|| fail("answer carries no certificate".into()))?;
        let cert = cipher
            .accept_peer(target.as_str(), pem)
            .map_err(|e| fail(format!("certificate refused: {e}")))?;
        log::info!(
            "endpoint {}: key exchange with {target} done (CN {})",
            self.own,
            cert.cn()
        );
        Ok(())
    }
}

/// `{cert_content: <own certificate PEM>, cert_ca_content: <root CA PEM>}`.
fn cert_payload(cipher: &CellCipher) -> Payload {
    let creds = cipher.credentials();
    let map: Map = [
        (
            Value::from(CERT_CONTENT),
            Value::Bin(Bytes::copy_from_slice(creds.cert().pem())),
        ),
        (
            Value::from(CERT_CA_CONTENT),
            Value::Bin(Bytes::copy_from_slice(creds.roots().pem())),
        ),
    ]
    .into_iter()
    .collect();
    Payload::value(Value::Map(map))
}
