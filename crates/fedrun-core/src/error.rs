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
    /// A numpy array was read as a type it does not hold.
    #[error("array holds {actual} elements, not {expected}")]
    DTypeMismatch {
        /// The type the caller asked for (e.g. `float32`).
        expected: String,
        /// The array's descr (e.g. `<f8`).
        actual: String,
    },
    /// A context prop already exists (locally or as a sticker of the context's manager) with a
    /// different mask; NVFlare refuses to change a prop's mask, and so does fedrun.
    #[error(
        "prop '{key}' already exists with mask {existing} (bit 0 sticky, bit 1 private); \
         refusing to set it with mask {requested}"
    )]
    PropMaskConflict {
        /// The prop key.
        key: String,
        /// The mask the prop already has.
        existing: u8,
        /// The mask the caller asked for.
        requested: u8,
    },
    /// A client dict is not a map.
    #[error("expect client dict to be a dict but got {0}")]
    ClientDictNotAMap(&'static str),
    /// A client dict has no (or an empty) `name`.
    #[error("missing 'name' from client dict")]
    ClientDictMissingName,
    /// A field of a client dict has the wrong type.
    #[error("invalid '{field}' in client dict: expected {expected} but got {got}")]
    ClientDictBadField {
        /// The field name.
        field: &'static str,
        /// The expected type.
        expected: &'static str,
        /// The type found.
        got: &'static str,
    },
    /// Two clients share one FQSN.
    #[error("two names ({name} and {other_name}) have the same FQN {fqsn}")]
    DuplicateFqsn {
        /// The later client's name.
        name: String,
        /// The earlier client's name.
        other_name: String,
        /// The shared FQSN.
        fqsn: String,
    },
    /// Two clients share one name.
    #[error("two FQNs ({fqsn} and {other_fqsn}) have the same name {name}")]
    DuplicateClientName {
        /// The later client's FQSN.
        fqsn: String,
        /// The earlier client's FQSN.
        other_fqsn: String,
        /// The shared name.
        name: String,
    },
    /// A client's parent FQSN names no client.
    #[error("missing node definition for FQN {parent}, which is the parent of {name}")]
    MissingParent {
        /// The parent FQSN that is not defined.
        parent: String,
        /// The name of the client whose parent is missing.
        name: String,
    },
    /// The job meta is not a map.
    #[error("invalid job meta type: expected dict but got {0}")]
    JobMetaNotAMap(&'static str),
    /// The job meta has no `job_clients`.
    #[error("missing job_clients in job meta")]
    MissingJobClients,
    /// The job meta's `job_clients` is not a list.
    #[error("invalid job_clients type: expected list but got {0}")]
    JobClientsNotAList(&'static str),
    /// A Shareable does not carry a DXO.
    #[error("shareable does not carry a DXO: {0}")]
    NotADxo(String),
    /// A DXO inside a Shareable is malformed.
    #[error("invalid DXO: {0}")]
    InvalidDxo(String),
}
