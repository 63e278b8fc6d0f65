//! NVFlare's FOBS payload codec, byte-exact with NVFlare 2.9.
//!
//! When an NVFlare cell sends an object (a Shareable, a dict, a string ...), the message payload
//! is `fobs.dumps(obj)`. This crate reads and writes exactly those bytes, in three layers:
//!
//! 1. **msgpack** ([`msgpack`]): a bounded, zero-copy reader (nesting limit, value limit, every
//!    length and count checked against the input, no allocation driven by a claimed length,
//!    `bin` values are slices of the input) and a writer that reproduces msgpack-python 1.x's
//!    default encodings byte for byte. Decoding holds at most [`DECODE_MEMORY_FACTOR`] × the
//!    input's length (see [`decode`]).
//! 2. **FOBS tags** ([`tags`]): Python objects that msgpack cannot express travel as
//!    `{"__fobs_type__", "__fobs_data__", "__fobs_dc__"}` maps. Tuples, sets, numpy arrays,
//!    Shareables and FLContexts become the typed [`fedrun_core::Value`] variants; every other
//!    tagged object is kept as [`fedrun_core::Value::Tagged`], so anything fedrun does not
//!    understand still round-trips unchanged.
//! 3. **LOBS container and datums** ([`lobs`], and [`decode`]/[`encode`]): the main msgpack
//!    section followed by datum sections that hold big `bytes`/`str` values (10 MiB or more by
//!    default), which the decoder puts back in place and the encoder moves out again in the
//!    order NVFlare does.
//! 4. **Download references** ([`download_ref`], [`npz`]): the datums that point at arrays a
//!    receiver must pull from their producer, and the `.npz` items those arrays travel in.
//!
//! Errors are one type, [`FobsError`]; bad input never panics.
//!
//! # Example
//! ```
//! use fedrun_core::{NdArray, Shareable, Value};
//! use fedrun_fobs::{decode, encode};
//!
//! let mut task = Shareable::new();
//! task.set_header("__task_name__", "train");
//! task.insert("weights", NdArray::from_f32(&[2], &[1.0, 1.0]).unwrap());
//!
//! let bytes = encode(&Value::from(task.clone())).unwrap();
//! let back = decode(bytes).unwrap();
//! assert_eq!(back.value.as_shareable(), Some(&task));
//! ```

mod codec;
pub mod download_ref;
mod error;
pub mod lobs;
pub mod msgpack;
pub mod npz;
pub mod tags;

pub use codec::{
    decode, decode_value, decode_with, encode, encode_payload, encode_segments,
    encode_segments_with_extra, encode_value, encode_with, DecodeOptions, EncodeOptions, Payload,
    DECODE_MEMORY_FACTOR, DEFAULT_MAX_VALUE_SIZE,
};
pub use error::FobsError;
