//! numpy arrays in their `.npy` form.

use bytes::Bytes;

/// A numpy array, held as its validated `.npy` bytes (so it re-encodes exactly as it came).
#[derive(Clone, Debug, PartialEq)]
pub struct NdArray {
    npy: Bytes,
}

impl NdArray {
    /// The `.npy` bytes.
    pub fn npy(&self) -> &Bytes {
        &self.npy
    }
}
