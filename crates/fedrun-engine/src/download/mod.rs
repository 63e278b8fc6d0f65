//! NVFlare's numpy download references, both ways.
//!
//! Inside a running NVFlare deployment a message does not embed its numpy arrays: each array
//! becomes a placeholder `T<k>`, the payload names the producer cell and a batch id (a TEXT
//! datum with dot 3), and the receiver pulls the arrays from the producer on channel
//! `download_service__`, topic `download_service__download`, in batches of `.npz` items of
//! about `np_download_chunk_size` bytes (2 MiB by default). The wire transport keeps those
//! references in the local header [`fedrun_cell::header::DOWNLOAD_REFS`]; this module does the
//! rest:
//!
//! - [`consumer`]: [`ArrayResolver`], the cell's [`fedrun_cell::PayloadResolver`] that pulls
//!   the arrays of a received message and puts them in place before any handler or waiting
//!   requester sees it, and [`download_arrays`], the protocol client;
//! - [`producer`]: [`DownloadService`], which serves arrays this cell offered, and
//!   [`DownloadHandle::offer`], which turns an outgoing Shareable's arrays into references;
//! - [`tree`]: finding and replacing arrays and placeholders in a value tree.
//!
//! Tensor references (dot 6, PyTorch jobs) are not supported: a message carrying them is
//! refused with an error naming the job, site and topic.

pub mod consumer;
pub mod producer;
pub mod tree;

use std::time::Duration;

pub use consumer::{download_arrays, ArrayResolver, DownloadError};
pub use producer::{DownloadHandle, DownloadService};

/// The download service's channel.
pub const CHANNEL: &str = "download_service__";
/// The download service's topic.
pub const TOPIC: &str = "download_service__download";

/// Keys of the protocol's payload maps.
pub mod key {
    /// The batch id (request).
    pub const REF_ID: &str = "ref_id";
    /// Where the download is (reply; echoed by the next request).
    pub const STATE: &str = "state";
    /// The items of a reply.
    pub const DATA: &str = "data";
    /// `"ok"`, `"eof"` or `"error"` (reply).
    pub const STATUS: &str = "status";
    /// The receiver will confirm a terminal reply if asked (request).
    pub const CONFIRM_CAPABLE: &str = "confirm_capable";
    /// The producer asks for a confirmation (terminal reply).
    pub const CONFIRM_EXPECTED: &str = "confirm_expected";
    /// Binds a confirmation to its terminal reply.
    pub const CONFIRM_NONCE: &str = "confirm_nonce";
    /// A confirmation: `"success"` or `"failed"` (request).
    pub const CONFIRM: &str = "confirm";
    /// The receiver gives up (request).
    pub const CANCEL: &str = "cancel";
    /// The producer understands `cancel` (reply).
    pub const CANCEL_CAPABLE: &str = "cancel_capable";
    /// First item of a batch (in `state`).
    pub const START: &str = "start";
    /// Number of items of a batch (in `state`).
    pub const COUNT: &str = "count";
}

/// Values of [`key::STATUS`].
pub mod status {
    /// A batch of items follows.
    pub const OK: &str = "ok";
    /// No more items.
    pub const EOF: &str = "eof";
    /// The producer failed.
    pub const ERROR: &str = "error";
}

/// Settings of both sides.
///
/// # Example
/// ```
/// use fedrun_engine::download::DownloadConfig;
///
/// let c = DownloadConfig::default();
/// assert_eq!(c.chunk_size, 2 * 1024 * 1024);
/// assert_eq!(c.idle_expiry.as_secs(), 60);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadConfig {
    /// Producer: a reply holds items up to about this many bytes (at least one item). NVFlare's
    /// `np_download_chunk_size`.
    pub chunk_size: usize,
    /// Producer: an offer nobody asked about for this long is dropped.
    pub idle_expiry: Duration,
    /// Consumer: how long one download request may take.
    pub request_timeout: Duration,
    /// Consumer: how many times a timed-out request is sent again (same state, so the producer
    /// serves the same batch).
    pub max_retries: u32,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            chunk_size: 2 * 1024 * 1024,
            idle_expiry: Duration::from_secs(60),
            request_timeout: Duration::from_secs(120),
            max_retries: 3,
        }
    }
}
