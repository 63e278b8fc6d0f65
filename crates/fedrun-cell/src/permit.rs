//! The inbound permit a transport attaches to a message it hands to a cell.
//!
//! A transport that reads from the network must stop reading when the work it has handed to
//! cells piles up: otherwise a fast peer makes a cell spawn any number of handler futures, each
//! holding a decoded payload (actix's mailbox bound does not help: it is counted per sender
//! address, and every delivery clones one). The transport therefore takes a permit from its
//! own budget before delivering and passes it along in [`crate::Deliver`]; the cell keeps it
//! until the message is done with (the request handler finished and its reply was routed, or
//! the reply reached its waiter), and dropping it gives the budget back. The permit is opaque
//! here: the cell only holds it.

use std::fmt;

/// A guard held by a cell for as long as it works on one delivered message. Dropping it
/// releases whatever the transport reserved for the message.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use fedrun_cell::InboundPermit;
///
/// let budget = Arc::new(tokio::sync::Semaphore::new(1));
/// let permit = InboundPermit::new(budget.clone().try_acquire_owned().unwrap());
/// assert_eq!(budget.available_permits(), 0);
/// drop(permit);
/// assert_eq!(budget.available_permits(), 1);
/// assert!(InboundPermit::none().is_none());
/// ```
#[derive(Default)]
pub struct InboundPermit(Option<Box<dyn Send + Sync + 'static>>);

impl InboundPermit {
    /// A permit that holds `guard` until it is dropped.
    pub fn new(guard: impl Send + Sync + 'static) -> InboundPermit {
        InboundPermit(Some(Box::new(guard)))
    }

    /// No permit (a delivery that reserved nothing, e.g. between cells of one process).
    pub fn none() -> InboundPermit {
        InboundPermit(None)
    }

    /// Whether this holds nothing.
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }
}

impl fmt::Debug for InboundPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "InboundPermit(held)"
        } else {
            "InboundPermit(none)"
        })
    }
}
