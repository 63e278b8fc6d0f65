//! Resolving payloads before anyone sees them: the hook for NVFlare's download references.
//!
//! An NVFlare sender does not embed numpy arrays in a message: it sends references and the
//! receiver pulls the arrays from the sending cell while decoding, so that a handler or a
//! waiting requester only ever sees complete payloads. A fedrun cell does the same through a
//! [`PayloadResolver`]: the wire transport marks a received message whose payload carries
//! references with the local-only header [`header::DOWNLOAD_REFS`](crate::header::DOWNLOAD_REFS),
//! and the cell hands such a message to its resolver before dispatching it (a request to its
//! handler, a reply to its waiter).
//!
//! The cell crate knows nothing about FOBS or arrays; the resolver that downloads lives with
//! the code that does (fedrun-engine's download consumer). A cell without a resolver refuses
//! marked messages loudly (error reply, logged), it never passes an unresolved payload on.

use futures::future::BoxFuture;

use fedrun_core::CellReturnCode;

use crate::message::CellMessage;

/// Why a payload could not be resolved: the cell return code the message turns into and a
/// text for `cn__error`.
///
/// # Example
/// ```
/// use fedrun_cell::ResolveError;
/// use fedrun_core::CellReturnCode;
///
/// let e = ResolveError::new(CellReturnCode::CommError, "producer site-1.J unreachable");
/// assert_eq!(e.to_string(), "comm_error: producer site-1.J unreachable");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {text}")]
pub struct ResolveError {
    /// `comm_error` when the producer could not be reached, `process_exception` when what came
    /// back (or what was referenced) is unusable.
    pub code: CellReturnCode,
    /// What went wrong, for `cn__error` and the log.
    pub text: String,
}

impl ResolveError {
    /// A resolve error.
    pub fn new(code: CellReturnCode, text: impl Into<String>) -> Self {
        ResolveError {
            code,
            text: text.into(),
        }
    }
}

/// Completes the payload of a received message that carries
/// [`header::DOWNLOAD_REFS`](crate::header::DOWNLOAD_REFS), e.g. by downloading the referenced
/// arrays and putting them in place. The returned message is dispatched as received (the cell
/// removes the header if the resolver left it).
///
/// Runs as a future detached from the cell's actor, so it may use the cell itself (through a
/// [`CellHandle`](crate::CellHandle)) to talk to the producer.
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use futures::future::{BoxFuture, FutureExt};
/// use fedrun_cell::{header, CellMessage, PayloadResolver, ResolveError};
///
/// struct Strip;
/// impl PayloadResolver for Strip {
///     fn resolve(&self, mut msg: CellMessage) -> BoxFuture<'static, Result<CellMessage, ResolveError>> {
///         msg.headers.remove(header::DOWNLOAD_REFS);
///         async move { Ok(msg) }.boxed()
///     }
/// }
/// let _resolver: Arc<dyn PayloadResolver> = Arc::new(Strip);
/// ```
pub trait PayloadResolver: Send + Sync + 'static {
    /// Resolves `msg`'s payload.
    ///
    /// # Errors
    ///
    /// A [`ResolveError`] when the payload cannot be completed; the cell then turns a reply into
    /// an error reply with that code and text, and answers a request with it.
    fn resolve(&self, msg: CellMessage) -> BoxFuture<'static, Result<CellMessage, ResolveError>>;
}
