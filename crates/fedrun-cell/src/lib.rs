//! NVFlare CellNet cells for fedrun.
//!
//! NVFlare processes talk through *cells*: endpoints named by FQCN (`server`, `site-1.<job>`)
//! that exchange messages made of `cn__*` headers and a payload, as requests with replies or as
//! fire-and-forget messages. This crate rebuilds that layer with actix: one
//! [`Cell`] actor per endpoint, and an in-process [`Network`] that delivers messages between the
//! cells of one process without encoding or copying the payload. A later TCP transport only
//! has to implement [`Transport`] (framing and FOBS encoding); cells do not change.
//!
//! Failures of the transport are never Rust errors for the sender: a request always yields a
//! reply, whose `cn__return_code` says `ok`, `timeout`, `target_unreachable`,
//! `process_exception`, ... exactly as NVFlare reports them. Rust errors ([`CellError`]) are
//! kept for local misuse and stopped actors.
//!
//! # Layout
//!
//! - [`fqcn`]: [`Fqcn`], validated cell names and their structure (root, parent, server side).
//! - [`message`]: [`CellMessage`], its ordered [`Headers`] with typed access to every `cn__*`
//!   key ([`header`]), [`MsgType`], [`CellCode`] and the [`Payload`] (shared, never copied).
//! - [`error`]: [`CellError`], and [`HandlerError`] with its mapping to cell return codes.
//! - [`abort`]: [`AbortSignal`], the cooperative cancellation flag with parent/child semantics.
//! - [`network`]: the [`Transport`] trait, the [`Deliver`] message and the in-process
//!   [`Network`].
//! - [`cell`]: the [`Cell`] actor, its messages ([`SendRequest`], [`SendMultiRequest`],
//!   [`FireAndForget`], [`RegisterRequestHandler`], [`Stop`]), request handlers and the typed
//!   [`CellHandle`].
//! - [`permit`]: [`InboundPermit`], the guard a network transport attaches to a delivery and
//!   the cell holds until it is done with the message (bounded inbound work).
//! - [`resolve`]: the [`PayloadResolver`] hook that completes payloads carrying download
//!   references before they are dispatched.
//!
//! # Example
//!
//! Two cells on one network; the server echoes requests on `test/echo`.
//!
//! ```
//! use std::time::Duration;
//! use fedrun_cell::{request_handler, Cell, CellMessage, Fqcn, Network, SendRequest};
//! use fedrun_core::{CellReturnCode, Shareable};
//!
//! actix::System::new().block_on(async {
//!     let network = Network::new();
//!     let server = Cell::start(Fqcn::SERVER, network.clone()).unwrap();
//!     let job = Cell::start(Fqcn::job_cell("site-1", "job-1").unwrap(), network.clone()).unwrap();
//!
//!     let echo = request_handler(|request: CellMessage| async move {
//!         Ok(Some(CellMessage::new(request.payload)))
//!     });
//!     server.register_request_handler("test", "echo", echo).await.unwrap();
//!
//!     let mut body = Shareable::new();
//!     body.insert("round", 3);
//!     let request = SendRequest::new(
//!         "test",
//!         "echo",
//!         Fqcn::SERVER,
//!         CellMessage::new(body.clone()),
//!         Duration::from_secs(5),
//!     );
//!     let reply = job.send_request(request).await.unwrap();
//!     assert_eq!(reply.return_code(), CellReturnCode::Ok);
//!     assert_eq!(reply.headers.origin(), Some("server"));
//!     assert_eq!(reply.payload.as_shareable(), Some(&body));
//!
//!     // Nobody is called "site-2": the reply says so instead of an error.
//!     let lost = SendRequest::new("test", "echo", Fqcn::new("site-2").unwrap(),
//!                                 CellMessage::empty(), Duration::from_secs(5));
//!     let reply = job.send_request(lost).await.unwrap();
//!     assert_eq!(reply.return_code(), CellReturnCode::TargetUnreachable);
//!
//!     job.stop().await;
//!     server.stop().await;
//! });
//! ```

pub mod abort;
pub mod cell;
pub mod error;
pub mod fqcn;
pub mod message;
pub mod network;
pub mod permit;
pub mod resolve;

pub use abort::AbortSignal;
pub use cell::{
    request_handler, Cell, CellHandle, FireAndForget, HandlerFn, HandlerResult, IncomingRequest,
    RegisterRequestHandler, RequestHandler, SendMultiRequest, SendRequest, SetPayloadResolver,
    Stop, MAILBOX_CAPACITY, WILDCARD,
};
pub use error::{CellError, HandlerError};
pub use fqcn::Fqcn;
pub use message::{header, CellCode, CellMessage, Headers, MsgType, Payload, PayloadEncoding};
pub use network::{Deliver, Network, Transport};
pub use permit::InboundPermit;
pub use resolve::{PayloadResolver, ResolveError};
