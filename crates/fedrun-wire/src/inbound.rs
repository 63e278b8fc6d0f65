//! Bounds on what peers can make this endpoint hold: connection slots and work in flight.
//!
//! A listener is reachable by anyone, so nothing a peer does may grow this process without
//! bound or lock real peers out:
//!
//! - **connection slots** ([`Slots`]): every accepted connection takes a slot, from `accept`
//!   until it closes, so the count never reaches the descriptor limit (`accept` failing with
//!   "too many open files" is how 118 silent peers locked real clients out). A connection is
//!   *silent* until the peer sends its first DATA frame: first while it has not finished its
//!   handshake, then handshaken but quiet. PING/PONG do not count: NVFlare's peers PING any
//!   connection idle for 60 s, so a PING proves the socket is alive, not that the peer does
//!   anything. Real NVFlare clients send a request (registration, task fetch, …) right after
//!   READY, so they leave the silent state within a round trip; a connection that is merely
//!   held open stays in it. When all slots are taken, the connection that has been silent the
//!   longest is closed to make room (each closure logged); when every slot holds an active
//!   connection, the newcomer is closed instead. Handshaken silent connections have a cap of
//!   their own (the longest-silent one beyond it is closed) and, optionally, a timeout.
//!   Connections this endpoint opened take no slot: they lead to its parents.
//! - **work in flight** ([`InFlight`]): a request read from a connection is handed to its cell
//!   with a permit from that connection's budget (a number of requests and a number of payload
//!   bytes), which the cell releases when the handler has finished. When the budget is spent
//!   the reader stops reading that connection until a permit comes back, so TCP's flow control
//!   slows the peer down instead of this process queueing handler futures without limit.
//!   Replies and returns take no permit: they only complete a waiting request of this process
//!   (bounded by what it sent), and holding them back could deadlock handlers that wait for
//!   them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use fedrun_cell::{CellMessage, Fqcn, InboundPermit};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::WireError;
use crate::frame::Frame;
use crate::limits::Bounded;
use crate::message::message_from_frame;

/// Where an accepted connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Accepted, no HELLO yet.
    Handshaking,
    /// Handshaken, no DATA frame yet.
    Silent,
    /// Has sent a DATA frame.
    Active,
}

struct Slot {
    phase: Phase,
    /// When the connection entered its phase.
    since: Instant,
    addr: SocketAddr,
    name: Option<String>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct SlotMap {
    next_id: u64,
    slots: HashMap<u64, Slot>,
}

/// The slots of accepted connections (see the module documentation).
pub(crate) struct Slots {
    own: Fqcn,
    max: usize,
    max_silent: usize,
    map: Mutex<SlotMap>,
}

/// A taken slot; dropping it frees the slot.
pub(crate) struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
    /// Cancelled when this connection is closed to make room.
    pub(crate) cancel: CancellationToken,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.lock().slots.remove(&self.id);
    }
}

impl SlotGuard {
    /// The peer finished its handshake as `name`: the connection is handshaken but silent. If
    /// that makes more silent connections than allowed, the one silent the longest is closed.
    pub(crate) fn handshaken(&self, name: &Fqcn) {
        let mut map = self.slots.lock();
        if let Some(slot) = map.slots.get_mut(&self.id) {
            slot.phase = Phase::Silent;
            slot.since = Instant::now();
            slot.name = Some(name.as_str().to_owned());
        }
        let silent = map
            .slots
            .values()
            .filter(|s| s.phase == Phase::Silent)
            .count();
        if silent > self.slots.max_silent {
            let why = format!(
                "more than {} handshaken connections have sent nothing",
                self.slots.max_silent
            );
            self.slots
                .evict_longest_silent(&mut map, &[Phase::Silent], &why);
        }
    }

    /// The peer sent its first DATA frame: the connection is no longer silent.
    pub(crate) fn activated(&self) {
        if let Some(slot) = self.slots.lock().slots.get_mut(&self.id) {
            slot.phase = Phase::Active;
            slot.since = Instant::now();
        }
    }
}

impl Slots {
    /// Slots for at most `max` accepted connections, at most `max_silent` of them handshaken
    /// and silent (both at least 1).
    pub(crate) fn new(own: Fqcn, max: usize, max_silent: usize) -> Arc<Slots> {
        Arc::new(Slots {
            own,
            max: max.max(1),
            max_silent: max_silent.max(1),
            map: Mutex::new(SlotMap::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotMap> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a connection just accepted from `addr` (its cancellation a child of
    /// `parent`), making room by closing the longest-silent connection when all are taken;
    /// `None` when every slot holds an active connection (the caller closes the newcomer).
    pub(crate) fn admit(
        self: &Arc<Self>,
        addr: SocketAddr,
        parent: &CancellationToken,
    ) -> Option<SlotGuard> {
        let mut map = self.lock();
        if map.slots.len() >= self.max {
            let why = format!("all {} connection slots are taken", self.max);
            let evicted =
                self.evict_longest_silent(&mut map, &[Phase::Handshaking, Phase::Silent], &why);
            if !evicted {
                log::warn!(
                    "endpoint {}: connection from {addr} closed: all {} connection slots hold \
                     active connections",
                    self.own,
                    self.max
                );
                return None;
            }
        }
        let id = map.next_id;
        map.next_id += 1;
        let cancel = parent.child_token();
        map.slots.insert(
            id,
            Slot {
                phase: Phase::Handshaking,
                since: Instant::now(),
                addr,
                name: None,
                cancel: cancel.clone(),
            },
        );
        Some(SlotGuard {
            slots: Arc::clone(self),
            id,
            cancel,
        })
    }

    /// Closes the connection that has been in one of `phases` the longest (logged with `why`);
    /// returns whether there was one. Its slot is freed at once.
    fn evict_longest_silent(&self, map: &mut SlotMap, phases: &[Phase], why: &str) -> bool {
        let victim = map
            .slots
            .iter()
            .filter(|(_, s)| phases.contains(&s.phase))
            .min_by_key(|(id, s)| (s.since, **id))
            .map(|(id, _)| *id);
        let Some(slot) = victim.and_then(|id| map.slots.remove(&id)) else {
            return false;
        };
        log::warn!(
            "endpoint {}: closing the connection from {} ({}), silent for {:?}, to make room: {why}",
            self.own,
            slot.addr,
            slot.name
                .as_deref()
                .map_or_else(|| "no handshake yet".to_owned(), |n| Bounded(n).to_string()),
            slot.since.elapsed()
        );
        slot.cancel.cancel();
        true
    }
}

/// The budget of requests a connection may have in flight in the cells of this endpoint.
pub(crate) struct InFlight {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: u32,
}

impl InFlight {
    /// At most `max_requests` requests and `max_bytes` bytes of payload (clamped to 4 GiB − 1;
    /// a bigger payload takes the whole byte budget, so it is served alone).
    pub(crate) fn new(max_requests: usize, max_bytes: u64) -> InFlight {
        let max_requests = max_requests.clamp(1, Semaphore::MAX_PERMITS);
        let max_bytes = u32::try_from(max_bytes).unwrap_or(u32::MAX).max(1);
        InFlight {
            requests: Arc::new(Semaphore::new(max_requests)),
            bytes: Arc::new(Semaphore::new(max_bytes as usize)),
            max_bytes,
        }
    }

    /// Waits until the budget has room for one request of `len` payload bytes and takes it.
    pub(crate) async fn acquire(&self, len: usize) -> InboundPermit {
        let n = u32::try_from(len).unwrap_or(u32::MAX).min(self.max_bytes);
        // never closed: the semaphores live as long as this budget
        let request = Arc::clone(&self.requests).acquire_owned().await.ok();
        let bytes = Arc::clone(&self.bytes).acquire_many_owned(n).await.ok();
        InboundPermit::new((request, bytes))
    }
}

/// [`message_from_frame`], on tokio's blocking pool when the payload has at least `blocking_min`
/// bytes: decoding a big FOBS payload must not hold an executor thread that serves other
/// connections.
pub(crate) async fn decode_frame(
    frame: Frame,
    blocking_min: usize,
) -> Result<CellMessage, WireError> {
    if frame.payload.len() < blocking_min {
        return message_from_frame(frame);
    }
    tokio::task::spawn_blocking(move || message_from_frame(frame))
        .await
        .map_err(|e| WireError::Io(std::io::Error::other(format!("decoding task failed: {e}"))))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[test]
    fn a_full_house_closes_the_longest_silent_connection_never_an_active_one() {
        let slots = Slots::new(Fqcn::SERVER, 3, 3);
        let root = CancellationToken::new();
        let a = slots.admit(addr(), &root).unwrap();
        let b = slots.admit(addr(), &root).unwrap();
        let c = slots.admit(addr(), &root).unwrap();
        a.handshaken(&Fqcn::new("site-1").unwrap());
        a.activated();
        b.handshaken(&Fqcn::new("site-2").unwrap());
        c.handshaken(&Fqcn::new("site-3").unwrap());
        let d = slots.admit(addr(), &root).unwrap();
        assert!(!a.cancel.is_cancelled(), "active connections stay");
        assert!(b.cancel.is_cancelled(), "the longest silent goes");
        assert!(!c.cancel.is_cancelled());
        d.activated();
        c.activated();
        assert!(slots.admit(addr(), &root).is_none(), "all active: refused");
        drop(a);
        assert!(
            slots.admit(addr(), &root).is_some(),
            "a freed slot is taken"
        );
    }

    #[test]
    fn silent_connections_beyond_their_cap_are_closed_oldest_first() {
        let slots = Slots::new(Fqcn::SERVER, 10, 2);
        let root = CancellationToken::new();
        let guards: Vec<_> = (0..3)
            .map(|_| slots.admit(addr(), &root).unwrap())
            .collect();
        for (i, g) in guards.iter().enumerate() {
            g.handshaken(&Fqcn::new(format!("site-{i}")).unwrap());
        }
        let closed: Vec<bool> = guards.iter().map(|g| g.cancel.is_cancelled()).collect();
        assert_eq!(closed, vec![true, false, false]);
    }

    #[tokio::test]
    async fn the_budget_is_given_back_when_the_permit_is_dropped() {
        let budget = InFlight::new(2, 100);
        let a = budget.acquire(10).await;
        let b = budget.acquire(10).await;
        let third = budget.acquire(10);
        tokio::pin!(third);
        assert!(futures::poll!(third.as_mut()).is_pending(), "two in flight");
        drop(a);
        let _c = third.await;
        drop(b);
        // one request slot is free, 90 of 100 bytes: a payload above the budget waits for all
        let big = budget.acquire(1000);
        tokio::pin!(big);
        assert!(futures::poll!(big.as_mut()).is_pending(), "bytes held");
    }
}
