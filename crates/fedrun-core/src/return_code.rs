//! Return codes: NVFlare's two vocabularies, kept apart.
//!
//! NVFlare has *application* return codes (upper case, carried in a Shareable's `__rc__` header)
//! and *cell* (transport) return codes (lower case, the `cn__return_code` header of a cell
//! message). Some cell codes are copied verbatim into Shareables by NVFlare's aux runner, so
//! [`ReturnCode`] can hold a cell code too, and any code a peer sends that fedrun does not know is
//! kept as [`ReturnCode::Other`] rather than rejected.

use std::fmt;
use std::str::FromStr;

macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $s:literal ),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),*
        }

        impl $name {
            /// Every known code, in NVFlare's order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The exact wire string.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $( $name::$variant => $s ),*
                }
            }

            /// Parse the exact wire string (case-sensitive).
            pub fn from_wire(s: &str) -> Option<Self> {
                match s {
                    $( $s => Some($name::$variant), )*
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// NVFlare's application return codes (`nvflare.apis.fl_constant.ReturnCode`).
    ///
    /// # Example
    /// ```
    /// use fedrun_core::AppReturnCode;
    /// assert_eq!(AppReturnCode::TopicUnknown.as_str(), "TOPIC_UNKNOWN");
    /// assert_eq!(AppReturnCode::from_wire("OK"), Some(AppReturnCode::Ok));
    /// ```
    AppReturnCode {
        /// `OK`
        Ok => "OK",
        /// `BAD_PEER_CONTEXT`
        BadPeerContext => "BAD_PEER_CONTEXT",
        /// `BAD_REQUEST_DATA`
        BadRequestData => "BAD_REQUEST_DATA",
        /// `BAD_TASK_DATA`
        BadTaskData => "BAD_TASK_DATA",
        /// `COMMUNICATION_ERROR`
        CommunicationError => "COMMUNICATION_ERROR",
        /// `TIMEOUT`
        Timeout => "TIMEOUT",
        /// `ERROR`
        Error => "ERROR",
        /// `EXECUTION_EXCEPTION`
        ExecutionException => "EXECUTION_EXCEPTION",
        /// `EXECUTION_RESULT_ERROR`
        ExecutionResultError => "EXECUTION_RESULT_ERROR",
        /// `HANDLER_EXCEPTION`
        HandlerException => "HANDLER_EXCEPTION",
        /// `MISSING_PEER_CONTEXT`
        MissingPeerContext => "MISSING_PEER_CONTEXT",
        /// `RUN_MISMATCH`
        RunMismatch => "RUN_MISMATCH",
        /// `TASK_ABORTED`
        TaskAborted => "TASK_ABORTED",
        /// `TASK_DATA_FILTER_ERROR`
        TaskDataFilterError => "TASK_DATA_FILTER_ERROR",
        /// `TASK_RESULT_FILTER_ERROR`
        TaskResultFilterError => "TASK_RESULT_FILTER_ERROR",
        /// `TASK_UNKNOWN`
        TaskUnknown => "TASK_UNKNOWN",
        /// `TASK_UNSUPPORTED`
        TaskUnsupported => "TASK_UNSUPPORTED",
        /// `TOPIC_UNKNOWN`
        TopicUnknown => "TOPIC_UNKNOWN",
        /// `MODEL_UNRECOGNIZED`
        ModelUnrecognized => "MODEL_UNRECOGNIZED",
        /// `VALIDATE_TYPE_UNKNOWN`
        ValidateTypeUnknown => "VALIDATE_TYPE_UNKNOWN",
        /// `EMPTY_RESULT`
        EmptyResult => "EMPTY_RESULT",
        /// `UNSAFE_JOB`
        UnsafeJob => "UNSAFE_JOB",
        /// `EARLY_TERMINATION`
        EarlyTermination => "EARLY_TERMINATION",
        /// `SERVER_NOT_READY`
        ServerNotReady => "SERVER_NOT_READY",
        /// `SERVICE_UNAVAILABLE`
        ServiceUnavailable => "SERVICE_UNAVAILABLE",
    }
}

string_enum! {
    /// CellNet's transport return codes (`nvflare.fuel.f3.cellnet.defs.ReturnCode`).
    ///
    /// # Example
    /// ```
    /// use fedrun_core::CellReturnCode;
    /// assert_eq!(CellReturnCode::TargetUnreachable.as_str(), "target_unreachable");
    /// ```
    CellReturnCode {
        /// `ok`
        Ok => "ok",
        /// `timeout`
        Timeout => "timeout",
        /// `invalid_target`
        InvalidTarget => "invalid_target",
        /// `target_unreachable`
        TargetUnreachable => "target_unreachable",
        /// `comm_error`
        CommError => "comm_error",
        /// `msg_too_big`
        MsgTooBig => "msg_too_big",
        /// `filter_error`
        FilterError => "filter_error",
        /// `invalid_request`
        InvalidRequest => "invalid_request",
        /// `process_exception`
        ProcessException => "process_exception",
        /// `authentication_error`
        AuthenticationError => "authentication_error",
        /// `service_unavailable`
        ServiceUnavailable => "service_unavailable",
        /// `invalid_session`
        InvalidSession => "invalid_session",
        /// `abort_run`
        AbortRun => "abort_run",
        /// `unauthenticated`
        Unauthenticated => "unauthenticated",
    }
}

/// The code in a Shareable's `__rc__` header: an application code, a cell code NVFlare copied
/// into a Shareable, or an unknown code received from a peer (kept verbatim).
///
/// Parsing never fails: application codes are tried first, then cell codes, then
/// [`ReturnCode::Other`].
///
/// # Example
/// ```
/// use fedrun_core::{AppReturnCode, CellReturnCode, ReturnCode};
///
/// assert_eq!(ReturnCode::from("OK"), ReturnCode::App(AppReturnCode::Ok));
/// assert_eq!(ReturnCode::from("abort_run"), ReturnCode::Cell(CellReturnCode::AbortRun));
/// assert_eq!(ReturnCode::from("NEW_CODE").as_str(), "NEW_CODE");
/// assert!(ReturnCode::OK.is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReturnCode {
    /// An application code.
    App(AppReturnCode),
    /// A cell code carried in a Shareable.
    Cell(CellReturnCode),
    /// A code fedrun does not know, as the peer sent it.
    Other(String),
}

impl ReturnCode {
    /// `OK`.
    pub const OK: ReturnCode = ReturnCode::App(AppReturnCode::Ok);

    /// The exact wire string.
    pub fn as_str(&self) -> &str {
        match self {
            ReturnCode::App(c) => c.as_str(),
            ReturnCode::Cell(c) => c.as_str(),
            ReturnCode::Other(s) => s,
        }
    }

    /// True only for the application code `OK`.
    pub fn is_ok(&self) -> bool {
        *self == ReturnCode::OK
    }
}

impl From<&str> for ReturnCode {
    fn from(s: &str) -> Self {
        if let Some(c) = AppReturnCode::from_wire(s) {
            ReturnCode::App(c)
        } else if let Some(c) = CellReturnCode::from_wire(s) {
            ReturnCode::Cell(c)
        } else {
            ReturnCode::Other(s.to_owned())
        }
    }
}

impl FromStr for ReturnCode {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ReturnCode::from(s))
    }
}

impl From<AppReturnCode> for ReturnCode {
    fn from(c: AppReturnCode) -> Self {
        ReturnCode::App(c)
    }
}

impl From<CellReturnCode> for ReturnCode {
    fn from(c: CellReturnCode) -> Self {
        ReturnCode::Cell(c)
    }
}

impl fmt::Display for ReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_wire_string() {
        for c in AppReturnCode::ALL {
            assert_eq!(AppReturnCode::from_wire(c.as_str()), Some(*c));
            assert_eq!(ReturnCode::from(c.as_str()), ReturnCode::App(*c));
        }
        for c in CellReturnCode::ALL {
            assert_eq!(CellReturnCode::from_wire(c.as_str()), Some(*c));
            assert_eq!(ReturnCode::from(c.as_str()), ReturnCode::Cell(*c));
        }
        assert_eq!(AppReturnCode::ALL.len(), 25);
        assert_eq!(CellReturnCode::ALL.len(), 14);
    }

    #[test]
    fn unknown_code_from_a_peer_is_kept_verbatim() {
        let rc = ReturnCode::from("Ok");
        assert_eq!(rc, ReturnCode::Other("Ok".into()));
        assert_eq!(rc.to_string(), "Ok");
        assert!(!rc.is_ok());
    }
}
