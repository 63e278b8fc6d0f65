//! NVFlare's data model, for fedrun.
//!
//! Everything fedrun's engine passes around is defined here, with no actors and no I/O, so that
//! codecs, transports and the engine all agree on one model:
//!
//! - [`Value`]: the dynamic values a payload carries (msgpack-native values plus the tagged
//!   Python objects NVFlare sends);
//! - [`Shareable`]: the string-keyed map with a `__headers__` map that every message carries;
//! - [`ReturnCode`], [`AppReturnCode`], [`CellReturnCode`]: the two return-code vocabularies;
//! - [`PeerContext`]: a serialised FLContext;
//! - [`FlContext`], [`FlContextManager`]: the live context and its shared sticky props;
//! - [`Client`], [`ClientHierarchy`], [`parse_job_clients`]: the job's sites and their forest;
//! - [`ClientRunInfo`], [`TaskAssignment`], [`StreamContext`], [`AuxMsgTarget`],
//!   [`ErrorRecord`]: the engine's small records;
//! - [`Dxo`], [`DataKind`]: the data exchange object training jobs flatten into Shareables;
//! - [`NdArray`]: numpy arrays in `.npy` form;
//! - [`constants`]: the exact strings NVFlare uses for keys, topics and events.

pub mod client;
pub mod constants;
pub mod dxo;
mod error;
pub mod fl_context;
pub mod ndarray;
pub mod peer_context;
pub mod records;
mod return_code;
mod shareable;
mod value;

pub use client::{
    build_client_hierarchy, parse_job_clients, Client, ClientHierarchy, HierarchyNode,
};
pub use dxo::{DataKind, Dxo};
pub use error::CoreError;
pub use fl_context::{FlContext, FlContextManager};
pub use ndarray::NdArray;
pub use peer_context::{ContextProp, PeerContext};
pub use records::{AuxMsgTarget, ClientRunInfo, ErrorRecord, StreamContext, TaskAssignment};
pub use return_code::{AppReturnCode, CellReturnCode, ReturnCode};
pub use shareable::Shareable;
pub use value::{Integer, Map, Tagged, Value, ENUM_DECOMPOSER};
