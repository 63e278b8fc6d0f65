//! The errors of the data model.

/// What can go wrong when reading or building NVFlare data.
///
/// # Example
/// ```
/// use fedrun_core::{CoreError, Shareable, Value};
///
/// let s = Shareable::with_headers(vec![("__headers__", Value::from(1))]);
/// assert!(matches!(s.header("x"), Err(CoreError::HeadersNotAMap(_))));
/// ```
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum CoreError {
    /// A Shareable's `__headers__` entry is not a map.
    #[error("header container must be a dict, but got {0}")]
    HeadersNotAMap(&'static str),
    /// Bytes that should be a `.npy` array are not a valid one.
    #[error("invalid .npy data: {0}")]
    InvalidNpy(String),
}
