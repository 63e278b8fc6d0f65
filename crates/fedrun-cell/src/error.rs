//! Errors of the cell layer, and how a request handler's failure becomes a return code.
//!
//! Two kinds of failure exist and they are kept apart:
//! - [`CellError`]: a local API misuse or a cell that is gone (bad FQCN, duplicate cell name,
//!   stopped actor). These are Rust errors returned to the caller.
//! - [`HandlerError`]: a request handler refusing or failing a request. These never reach the
//!   requester as a Rust error: the cell turns them into a reply whose `cn__return_code` is the
//!   mapped code, exactly as NVFlare maps callback exceptions.
//!
//! Transport failures (unknown target, timeout, ...) are neither: they are replies with a code,
//! see [`crate::cell::SendRequest`].

use fedrun_core::CellReturnCode;

use crate::fqcn::Fqcn;
use crate::message::CellMessage;

/// What can go wrong when using a cell or the network locally.
///
/// # Example
///
/// ```
/// use fedrun_cell::{CellError, Fqcn};
///
/// let err = Fqcn::new("site 1").unwrap_err();
/// assert!(matches!(err, CellError::InvalidFqcn { .. }));
/// assert!(err.to_string().contains("site 1"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CellError {
    /// A string is not a valid FQCN.
    #[error("invalid FQCN '{fqcn}': {reason}")]
    InvalidFqcn {
        /// The rejected name, as given.
        fqcn: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A live cell is already registered under this FQCN in the network.
    #[error("a live cell is already registered as '{0}'")]
    DuplicateFqcn(Fqcn),
    /// A request handler was registered with an empty channel or topic.
    #[error("invalid handler key (channel '{channel}', topic '{topic}'): both must be non-empty")]
    InvalidHandlerKey {
        /// The channel given.
        channel: String,
        /// The topic given.
        topic: String,
    },
    /// The cell actor has stopped; its mailbox is closed.
    ///
    /// When the cell was already known to be stopped before the call, the message that could
    /// not be sent is handed back in `unsent` so that the caller can retry elsewhere.
    #[error("cell '{fqcn}' is stopped")]
    Stopped {
        /// The stopped cell.
        fqcn: Fqcn,
        /// The message of the failed call, when it was not consumed.
        unsent: Option<Box<CellMessage>>,
    },
}

/// Why a request handler refused or failed a request (NVFlare's callback exceptions).
///
/// The cell answers the requester with [`HandlerError::return_code`] in `cn__return_code` and
/// the error's text in `cn__error`.
///
/// # Example
///
/// ```
/// use fedrun_cell::HandlerError;
/// use fedrun_core::CellReturnCode;
///
/// assert_eq!(HandlerError::AbortRun.return_code(), CellReturnCode::AbortRun);
/// let e = HandlerError::from("disk full");
/// assert_eq!(e.return_code(), CellReturnCode::ProcessException);
/// assert_eq!(e.to_string(), "disk full");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// The service is not available now (`service_unavailable`).
    #[error("service unavailable")]
    ServiceUnavailable,
    /// The request belongs to a session that is not valid here (`invalid_session`).
    #[error("invalid session")]
    InvalidSession,
    /// The request is malformed (`invalid_request`).
    #[error("invalid request")]
    InvalidRequest,
    /// The requester is not authenticated (`authentication_error`).
    #[error("authentication error")]
    AuthenticationError,
    /// The job run is being aborted (`abort_run`).
    #[error("run aborted")]
    AbortRun,
    /// Any other failure (`process_exception`), with its description.
    #[error("{0}")]
    Other(String),
}

impl HandlerError {
    /// The cell return code NVFlare uses for this failure.
    pub fn return_code(&self) -> CellReturnCode {
        match self {
            HandlerError::ServiceUnavailable => CellReturnCode::ServiceUnavailable,
            HandlerError::InvalidSession => CellReturnCode::InvalidSession,
            HandlerError::InvalidRequest => CellReturnCode::InvalidRequest,
            HandlerError::AuthenticationError => CellReturnCode::AuthenticationError,
            HandlerError::AbortRun => CellReturnCode::AbortRun,
            HandlerError::Other(_) => CellReturnCode::ProcessException,
        }
    }
}

impl From<&HandlerError> for CellReturnCode {
    fn from(e: &HandlerError) -> Self {
        e.return_code()
    }
}

impl From<String> for HandlerError {
    fn from(s: String) -> Self {
        HandlerError::Other(s)
    }
}

impl From<&str> for HandlerError {
    fn from(s: &str) -> Self {
        HandlerError::Other(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_handler_error_maps_to_the_nvflare_code() {
        let cases = [
            (HandlerError::ServiceUnavailable, "service_unavailable"),
            (HandlerError::InvalidSession, "invalid_session"),
            (HandlerError::InvalidRequest, "invalid_request"),
            (HandlerError::AuthenticationError, "authentication_error"),
            (HandlerError::AbortRun, "abort_run"),
            (HandlerError::Other("x".into()), "process_exception"),
        ];
        for (e, code) in cases {
            assert_eq!(CellReturnCode::from(&e).as_str(), code);
        }
    }
}
