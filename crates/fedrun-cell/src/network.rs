//! The in-process network: how a cell's message reaches another cell of the same process.
//!
//! Cells never hold each other's addresses. They hand every outgoing message to a
//! [`Transport`], which finds the destination cell by FQCN and delivers a [`Deliver`] to its
//! mailbox. [`Network`] is the in-process transport: a shared map FQCN → mailbox, read under a
//! lock for the lookup only, so routing costs one map lookup and one actor message (no
//! intermediate "router" actor, no payload copy).
//!
//! The trait exists so that a TCP connector can later implement the same three operations:
//! `register` (a local cell becomes reachable), `unregister`, and `route` (for TCP: pick the
//! connection by NVFlare's route rule, encode, frame, write). A [`crate::Cell`] only ever sees an
//! `Arc<dyn Transport>`, so it needs no change when the transport does.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use actix::{Message, Recipient};
use fedrun_core::CellReturnCode;
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::error::CellError;
use crate::fqcn::Fqcn;
use crate::message::CellMessage;
use crate::permit::InboundPermit;

/// A message handed to a cell by its transport: a request for it, or a reply to one of its
/// requests. Cells register a `Recipient<Deliver>` with their transport.
///
/// The result is `()`: the transport only learns that the cell accepted the message (its
/// mailbox took it and the cell processed the hand-over), not what the cell did with it.
///
/// The [`InboundPermit`] is held by the cell until it is done with the message (a request's
/// handler finished and its reply was routed, a reply reached its waiter): a network transport
/// bounds the work in flight with it. [`Deliver::new`] carries none.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Deliver(pub CellMessage, pub InboundPermit);

impl Deliver {
    /// A delivery that reserved nothing.
    pub fn new(msg: CellMessage) -> Deliver {
        Deliver(msg, InboundPermit::none())
    }
}

/// What a cell needs from the medium that carries its messages.
///
/// Implementations must be cheap to call concurrently (`&self`, `Send + Sync`) and must apply
/// back-pressure instead of buffering without bound.
pub trait Transport: Send + Sync + 'static {
    /// Makes the local cell `fqcn` reachable: messages whose `cn__destination` is `fqcn` are
    /// delivered to `inbox`.
    ///
    /// # Errors
    ///
    /// [`CellError::DuplicateFqcn`] when a live cell already uses that name.
    fn register(&self, fqcn: Fqcn, inbox: Recipient<Deliver>) -> Result<(), CellError>;

    /// Makes the cell `fqcn` unreachable. Unknown names are ignored.
    fn unregister(&self, fqcn: &Fqcn);

    /// Delivers `msg` to the cell named by its `cn__destination` header.
    ///
    /// Resolves once the destination accepted the message. Errors are the cell return code the
    /// sender should report: `invalid_target` when the destination header is missing or not a
    /// valid FQCN, `target_unreachable` when no live cell has that name.
    fn route(&self, msg: CellMessage) -> BoxFuture<'static, Result<(), CellReturnCode>>;
}

/// The in-process network: every cell of this process, by FQCN.
///
/// A cheap cloneable handle (clones share the same map). Lookup is exact: in one process every
/// cell is directly reachable, so there is no forwarding and no prefix matching.
///
/// # Example
///
/// ```
/// use fedrun_cell::{CellMessage, Network, header};
/// use fedrun_core::CellReturnCode;
///
/// actix::System::new().block_on(async {
///     let net = Network::new();
///     let msg = CellMessage::empty().with_header(header::DESTINATION, "site-9");
///     assert_eq!(net.route(msg).await, Err(CellReturnCode::TargetUnreachable));
/// });
/// ```
#[derive(Clone, Default)]
pub struct Network {
    cells: Arc<RwLock<HashMap<Fqcn, Recipient<Deliver>>>>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("cells", &self.cells())
            .finish()
    }
}

impl Network {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `inbox` reachable as `fqcn`. A previous registration whose cell has stopped is
    /// replaced; a live one is kept and the call fails.
    ///
    /// # Errors
    ///
    /// [`CellError::DuplicateFqcn`] when a live cell already uses that name.
    pub fn register(&self, fqcn: Fqcn, inbox: Recipient<Deliver>) -> Result<(), CellError> {
        let mut cells = self.cells.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = cells.get(&fqcn) {
            if existing.connected() {
                return Err(CellError::DuplicateFqcn(fqcn));
            }
            log::info!("network: replacing the stopped cell registered as {fqcn}");
        }
        log::debug!("network: cell {fqcn} registered");
        cells.insert(fqcn, inbox);
        Ok(())
    }

    /// Removes `fqcn`; unknown names are ignored.
    pub fn unregister(&self, fqcn: &Fqcn) {
        let removed = self
            .cells
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(fqcn);
        if removed.is_some() {
            log::debug!("network: cell {fqcn} unregistered");
        }
    }

    /// Whether a cell is registered under `fqcn` (it may have stopped since).
    pub fn contains(&self, fqcn: &Fqcn) -> bool {
        self.cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(fqcn)
    }

    /// The registered names, sorted.
    pub fn cells(&self) -> Vec<Fqcn> {
        let mut names: Vec<Fqcn> = self
            .cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Delivers `msg` to the cell named by its `cn__destination`, waiting for mailbox space
    /// when the cell is busy (back-pressure; nothing is ever queued without bound).
    ///
    /// # Errors
    ///
    /// `invalid_target` when the destination is missing or not a valid FQCN;
    /// `target_unreachable` when no cell has that name or its mailbox is closed (the stale
    /// entry is then removed).
    pub async fn route(&self, msg: CellMessage) -> Result<(), CellReturnCode> {
        let destination = match msg.headers.destination().map(Fqcn::new) {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                log::warn!("network: dropping a message with an invalid destination: {e}");
                return Err(CellReturnCode::InvalidTarget);
            }
            None => {
                log::warn!(
                    "network: dropping a message without destination (channel {:?}, topic {:?}, origin {:?})",
                    msg.headers.channel(),
                    msg.headers.topic(),
                    msg.headers.origin()
                );
                return Err(CellReturnCode::InvalidTarget);
            }
        };
        // Clone the recipient and release the lock before awaiting.
        let inbox = self
            .cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&destination)
            .cloned();
        let Some(inbox) = inbox else {
            log::debug!("network: no cell named {destination}");
            return Err(CellReturnCode::TargetUnreachable);
        };
        match inbox.send(Deliver::new(msg)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                log::debug!("network: cell {destination} cannot take messages ({e})");
                let mut cells = self.cells.write().unwrap_or_else(PoisonError::into_inner);
                if cells.get(&destination).is_some_and(|r| !r.connected()) {
                    cells.remove(&destination);
                }
                Err(CellReturnCode::TargetUnreachable)
            }
        }
    }
}

impl Transport for Network {
    fn register(&self, fqcn: Fqcn, inbox: Recipient<Deliver>) -> Result<(), CellError> {
        Network::register(self, fqcn, inbox)
    }

    fn unregister(&self, fqcn: &Fqcn) {
        Network::unregister(self, fqcn)
    }

    fn route(&self, msg: CellMessage) -> BoxFuture<'static, Result<(), CellReturnCode>> {
        let net = self.clone();
        async move { net.route(msg).await }.boxed()
    }
}
