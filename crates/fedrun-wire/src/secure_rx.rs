//! The receiving half of secure messages: key exchanges answered (or handed to the send that
//! asked), encrypted frames for local cells opened before they are decoded, frames from an
//! origin whose certificate is unknown held (bounded) while it is asked for, and what does not
//! open dropped with a log line (a request among them answered `authentication_error`).

use bytes::Bytes;
use fedrun_cell::{header, CellMessage, Fqcn, Headers, InboundPermit, MsgType, Payload};
use fedrun_core::{CellReturnCode, Map, Value};
use fedrun_secure::{CellCipher, SecureError, CERT_CONTENT, CERT_ERROR};
use tokio::sync::mpsc;

use super::super::{needs_permit, ConnBudget};
use super::{
    cert_payload, describe, field, is_key_exchange, Held, Inner, Outbound, MAX_HELD_BYTES,
    MAX_HELD_ORIGINS,
};
use crate::error::WireError;
use crate::frame::Frame;
use crate::inbound::{decode_frame, InFlight};
use crate::message::{frame_from_message, message_from_frame};

impl Inner {
    /// The receive hook, before a frame for a local cell is decoded: key exchanges are handled
    /// here, encrypted frames opened (or held until their origin's certificate is known).
    /// Returns the frame to decode and deliver, or `None` when it was consumed.
    pub(crate) async fn open_incoming(
        &self,
        peer: &Fqcn,
        frame: Frame,
        tx: &mpsc::Sender<Outbound>,
    ) -> Option<Frame> {
        let Some(h) = frame.headers.as_ref() else {
            return Some(frame);
        };
        // only what is for a cell hosted here (or this endpoint) is ours to answer or open; the
        // rest takes the local path, which answers what it cannot deliver
        let for_us = h
            .destination()
            .and_then(|d| Fqcn::new(d).ok())
            .is_some_and(|d| d == self.own || self.local_cell(&d).is_some());
        if !for_us {
            return Some(frame);
        }
        if is_key_exchange(h) {
            self.on_key_exchange(peer, frame, tx).await;
            return None;
        }
        if h.get(header::ENCRYPTED).and_then(Value::as_bool) != Some(true) {
            return Some(frame);
        }
        let Some(origin) = h.origin().map(str::to_owned) else {
            log::warn!(
                "endpoint {}: encrypted frame from {peer} without origin dropped",
                self.own
            );
            return None;
        };
        let Some(cipher) = self.secure.cipher.clone() else {
            let why = "no credentials for secure messages are configured";
            self.refuse_sealed(peer, h, why, tx).await;
            return None;
        };
        // frames of an origin whose certificate is being asked for keep their order
        if cipher.peer(&origin).is_none() || self.secure.held().by_origin.contains_key(&origin) {
            self.hold(peer, origin, frame, tx).await;
            return None;
        }
        self.open_frame(&cipher, peer, frame, tx).await
    }

    /// Opens an encrypted frame whose origin's certificate is known.
    async fn open_frame(
        &self,
        cipher: &CellCipher,
        peer: &Fqcn,
        mut frame: Frame,
        tx: &mpsc::Sender<Outbound>,
    ) -> Option<Frame> {
        let h = frame.headers.as_ref()?;
        let origin = h.origin().unwrap_or("");
        let opened = cipher.decrypt_from(origin, &frame.payload);
        let announced = h.get(header::CLEAR_PAYLOAD_LEN).and_then(Value::as_u64);
        let clear = match opened {
            Ok(clear) if announced.is_none_or(|n| n == clear.len() as u64) => clear,
            Ok(clear) => {
                let why = format!(
                    "cleartext of {} bytes, cn__clear_payload_len says {announced:?}",
                    clear.len()
                );
                self.refuse_sealed(peer, h, &why, tx).await;
                return None;
            }
            Err(e) => {
                self.refuse_sealed(peer, h, &e.to_string(), tx).await;
                return None;
            }
        };
        let h = frame.headers.as_mut()?;
        h.remove(header::ENCRYPTED);
        h.set_payload_len(clear.len() as u64);
        frame.payload = Bytes::from(clear);
        Some(frame)
    }

    /// Drops an encrypted frame that cannot be opened, with a log line; a request that
    /// expects a reply is answered `authentication_error` so its sender does not wait.
    async fn refuse_sealed(
        &self,
        peer: &Fqcn,
        h: &Headers,
        why: &str,
        tx: &mpsc::Sender<Outbound>,
    ) {
        log::warn!(
            "endpoint {}: encrypted {} via {peer} dropped: {why}",
            self.own,
            describe(h)
        );
        let wants_reply = h.msg_type() == Some(MsgType::Req) && h.reply_expected() == Some(true);
        let Some(req_id) = h.req_id().filter(|_| wants_reply) else {
            return;
        };
        let Some(mut reply) = self.answer_headers(h, peer, MsgType::Reply) else {
            return;
        };
        reply.set_req_id(req_id);
        reply.set_return_code(CellReturnCode::AuthenticationError);
        reply.set_error(format!("secure message not opened: {why}"));
        self.queue_answer(peer, reply, tx).await;
    }

    /// Holds an encrypted frame until its origin's certificate is known; the first frame of
    /// an origin starts the key exchange.
    async fn hold(&self, peer: &Fqcn, origin: String, frame: Frame, tx: &mpsc::Sender<Outbound>) {
        let len = frame.payload.len();
        let refused = {
            let mut held = self.secure.held();
            let new_origin = !held.by_origin.contains_key(&origin);
            if held.bytes.saturating_add(len) > MAX_HELD_BYTES {
                Some(format!(
                    "{MAX_HELD_BYTES} bytes already wait for certificates"
                ))
            } else if new_origin && held.by_origin.len() >= MAX_HELD_ORIGINS {
                Some(format!(
                    "{MAX_HELD_ORIGINS} origins already wait for certificates"
                ))
            } else {
                held.bytes += len;
                let dest = frame
                    .headers
                    .as_ref()
                    .and_then(Headers::destination)
                    .map(str::to_owned);
                held.by_origin
                    .entry(origin.clone())
                    .or_default()
                    .push_back(Held {
                        peer: peer.clone(),
                        frame,
                        tx: tx.clone(),
                    });
                if new_origin {
                    self.spawn_exchange(origin.clone(), dest);
                }
                return;
            }
        };
        if let Some(why) = refused {
            if let Some(h) = frame.headers.as_ref() {
                self.refuse_sealed(peer, h, &why, tx).await;
            }
        }
    }

    /// Asks `origin` for its certificate (as the local cell `dest`), then opens and delivers
    /// the frames held for it, in order.
    fn spawn_exchange(&self, origin: String, dest: Option<String>) {
        let Some(endpoint) = self.secure.endpoint.upgrade() else {
            return;
        };
        let Some(cipher) = self.secure.cipher.clone() else {
            return;
        };
        log::info!(
            "endpoint {}: encrypted message from {origin} before its certificate: asking for it",
            self.own
        );
        tokio::spawn(async move {
            let exchanged = match Fqcn::new(&origin) {
                Ok(target) => {
                    let from = dest.unwrap_or_else(|| endpoint.own.to_string());
                    endpoint.ensure_cert(&cipher, &from, &target).await
                }
                Err(_) => Err(WireError::InvalidDestination(origin.clone())),
            };
            // the held frames left their connection's reader: they get a budget of their own
            // (they are few: bounded by MAX_HELD_ORIGINS and MAX_HELD_BYTES)
            let inflight = InFlight::new(
                endpoint.config.max_inflight_requests,
                endpoint.config.max_inflight_bytes,
            );
            let cancel = endpoint.shutdown.child_token();
            let budget = ConnBudget {
                inflight: &inflight,
                cancel: &cancel,
            };
            loop {
                let batch: Vec<Held> = {
                    let mut held = endpoint.secure.held();
                    let Some(queue) = held.by_origin.get_mut(&origin) else {
                        break;
                    };
                    if queue.is_empty() {
                        held.by_origin.remove(&origin);
                        break;
                    }
                    let batch: Vec<Held> = queue.drain(..).collect();
                    let bytes: usize = batch.iter().map(|b| b.frame.payload.len()).sum();
                    held.bytes = held.bytes.saturating_sub(bytes);
                    batch
                };
                for Held { peer, frame, tx } in batch {
                    if let Err(e) = &exchanged {
                        if let Some(h) = frame.headers.as_ref() {
                            let why = format!("no certificate of the origin: {e}");
                            endpoint.refuse_sealed(&peer, h, &why, &tx).await;
                        }
                        continue;
                    }
                    let Some(frame) = endpoint.open_frame(&cipher, &peer, frame, &tx).await else {
                        continue;
                    };
                    let permit = if needs_permit(&frame) {
                        tokio::select! {
                            biased;
                            () = cancel.cancelled() => return,
                            p = inflight.acquire(frame.payload.len()) => p,
                        }
                    } else {
                        InboundPermit::none()
                    };
                    match decode_frame(frame, endpoint.config.blocking_decode_min).await {
                        Ok(msg) => {
                            endpoint
                                .handle_incoming(&peer, msg, permit, &budget, &tx)
                                .await;
                        }
                        Err(e) => log::warn!(
                            "endpoint {}: decrypted message from {origin} dropped: {e}",
                            endpoint.own
                        ),
                    }
                }
            }
        });
    }

    /// A key-exchange request (answered at once) or reply (handed to the waiting send).
    async fn on_key_exchange(&self, peer: &Fqcn, frame: Frame, tx: &mpsc::Sender<Outbound>) {
        let msg = match message_from_frame(frame) {
            Ok(m) => m,
            Err(e) => {
                log::warn!(
                    "endpoint {}: key exchange from {peer} dropped: {e}",
                    self.own
                );
                return;
            }
        };
        let h = &msg.headers;
        if h.msg_type() != Some(MsgType::Req) {
            let waiter = h
                .req_ids()
                .first()
                .and_then(|id| self.secure.waiters().remove(*id));
            match waiter {
                Some(w) => {
                    let _ = w.send(msg);
                }
                None => log::debug!(
                    "endpoint {}: key-exchange answer {} from {peer} expected by nobody",
                    self.own,
                    describe(h)
                ),
            }
            return;
        }
        let origin = h.origin().unwrap_or("");
        let (code, payload) = match &self.secure.cipher {
            None => {
                log::warn!(
                    "endpoint {}: key exchange from {origin} answered without a certificate: \
                     no credentials for secure messages are configured",
                    self.own
                );
                let map: Map = [(Value::from(CERT_ERROR), Value::from("no credentials"))]
                    .into_iter()
                    .collect();
                (CellReturnCode::Ok, Payload::value(Value::Map(map)))
            }
            Some(cipher) => {
                let offered = field(&msg.payload, CERT_CONTENT).and_then(Value::as_bin);
                let accepted = match offered {
                    Some(pem) => cipher.accept_peer(origin, pem).map(|_| ()),
                    None => Err(SecureError::NoCertificate),
                };
                match accepted {
                    Ok(()) => {
                        log::info!("endpoint {}: certificate of {origin} accepted", self.own);
                        (CellReturnCode::Ok, cert_payload(cipher))
                    }
                    Err(e) => {
                        log::warn!(
                            "endpoint {}: certificate offered by {origin} via {peer} refused: {e}",
                            self.own
                        );
                        (CellReturnCode::ProcessException, Payload::None)
                    }
                }
            }
        };
        if h.reply_expected() != Some(true) {
            return;
        }
        let Some(mut reply) = self.answer_headers(h, peer, MsgType::Reply) else {
            return;
        };
        if let Some(id) = h.req_id() {
            reply.set_req_id(id);
        }
        reply.set_return_code(code);
        match frame_from_message(CellMessage {
            headers: reply,
            payload,
        }) {
            Ok(frame) => {
                let out = Outbound {
                    frame,
                    body: None,
                    done: None,
                };
                if tx.send(out).await.is_err() {
                    log::debug!(
                        "endpoint {}: key-exchange answer to {peer} not sent: closing",
                        self.own
                    );
                }
            }
            Err(e) => log::warn!("endpoint {}: key-exchange answer not built: {e}", self.own),
        }
    }
}
