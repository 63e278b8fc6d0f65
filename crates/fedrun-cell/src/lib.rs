//! NVFlare CellNet cells for fedrun.

pub mod abort;
pub mod cell;
pub mod error;
pub mod fqcn;
pub mod message;
pub mod network;

pub use abort::AbortSignal;
pub use cell::{
    request_handler, Cell, CellHandle, FireAndForget, HandlerFn, HandlerResult, IncomingRequest,
    RegisterRequestHandler, RequestHandler, SendMultiRequest, SendRequest, Stop,
};
pub use error::{CellError, HandlerError};
pub use fqcn::Fqcn;
pub use message::{header, CellCode, CellMessage, Headers, MsgType, Payload, PayloadEncoding};
pub use network::{Deliver, Network, Transport};
