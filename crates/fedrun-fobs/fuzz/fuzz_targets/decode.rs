//! Fuzz target: every decoder must return (a value or a typed error) on any input, and whatever
//! decodes must encode again.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    if let Ok(payload) = fedrun_fobs::decode(input.clone()) {
        let _ = fedrun_fobs::encode_payload(&payload, &fedrun_fobs::EncodeOptions::default());
    }
    if let Ok(value) = fedrun_fobs::decode_value(input.clone()) {
        let _ = fedrun_fobs::encode_value(&value);
    }
    let _ = fedrun_fobs::msgpack::decode(input.clone());
    let _ = fedrun_core::NdArray::from_npy(input);
});
