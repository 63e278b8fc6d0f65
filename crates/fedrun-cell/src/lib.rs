//! NVFlare CellNet cells for fedrun.

pub mod abort;

pub use abort::AbortSignal;
