//! NVFlare 2.9's end-to-end "secure" CellNet messages for fedrun.
//!
//! A CellNet message sent with `secure=true` (NVFlare's `cn__secure`) has its encoded payload
//! replaced by an envelope that only the destination cell can open and that only the origin
//! cell can have made; hops in between pass it on unread. NVFlare uses it for peer-to-peer aux
//! traffic between client jobs (Swarm and the other client-controlled workflows), always
//! through the server. This crate is the cryptography and the certificate bookkeeping of it;
//! `fedrun-wire` puts it on the wire (the key exchange on channel `credential_manager`, topic
//! `key_exchange`, the `cn__encrypted` and `cn__clear_payload_len` headers, per-chunk
//! encryption of streams).
//!
//! - [`envelope`]: the byte format (version, nonce, RSA-OAEP-wrapped AES key, RSA-PSS
//!   signature, AES-256-GCM ciphertext) and its bounded parser.
//! - [`cert`]: certificates (PEM, CN, public key) and their validation against the root CA.
//! - [`identity`]: NVFlare's binding of certificate CNs to cell names (`site-1.J1` → `site-1`).
//! - [`credentials`]: a cell's key, certificate and root CA, loaded from a startup kit.
//! - [`cipher`]: [`CellCipher`], the per-endpoint state (peer certificates, per-receiver AES
//!   keys, unwrapped sender keys), every table bounded.
//!
//! # What it protects, and what not
//!
//! The payload is confidential and authenticated end to end (the signature covers the
//! version, nonce, wrapped key and ciphertext; GCM authenticates the ciphertext). The headers
//! are not covered (only hop-by-hop TLS protects them), there is no replay protection (an
//! envelope can be delivered again), and the AES key towards a receiver is reused for the
//! sender's whole life, as NVFlare does. Keys must be 2048-bit RSA (the layout fixes 256-byte
//! blocks).
//!
//! # RUSTSEC-2023-0071 (Marvin: RSA private-key timing)
//!
//! The RustCrypto `rsa` crate is listed as affected by a timing side channel in its private-key
//! operation, with no patched version. Opening an envelope performs one such operation (the
//! RSA-OAEP unwrap of `key_enc`), on a value a peer chose; a Marvin-style attack needs a very
//! large number of such decryptions with timing measurements. The mitigation chosen here,
//! instead of a second RSA implementation:
//!
//! 1. the unwrap happens only after the envelope's signature verified under the sender's
//!    certificate, and that certificate was accepted only if it chains to the federation's
//!    root CA and (with `mtls`, the default) carries the CN of the cell it speaks for; an
//!    outsider cannot make us decrypt anything;
//! 2. an unwrapped key is cached per (sender certificate, wrapped key) and each sender
//!    certificate gets at most [`cipher::MAX_KEYS_PER_SENDER`] distinct wrapped keys (an
//!    NVFlare sender uses one per receiver for its lifetime), so even a provisioned insider
//!    gets a handful of timing samples, not millions;
//! 3. the `rsa` crate's blinding stays on (its default).
//!
//! The residual risk is a federation member whose key was provisioned by the same CA; the
//! signature (RSA-PSS) is a private operation on our own data, not an oracle.

pub mod cert;
pub mod cipher;
pub mod credentials;
pub mod envelope;
pub mod error;
pub mod identity;

pub use cert::{CellCert, TrustRoots, VerifyTime};
pub use cipher::CellCipher;
pub use credentials::CellCredentials;
pub use error::SecureError;
pub use identity::IdentityResolver;

/// The channel of NVFlare's certificate exchange.
pub const KEY_EXCHANGE_CHANNEL: &str = "credential_manager";
/// The topic of NVFlare's certificate exchange.
pub const KEY_EXCHANGE_TOPIC: &str = "key_exchange";
/// Key-exchange payload field: the sender's certificate PEM (bytes).
pub const CERT_CONTENT: &str = "cert_content";
/// Key-exchange payload field: the sender's root CA PEM (bytes; sent, never used).
pub const CERT_CA_CONTENT: &str = "cert_ca_content";
/// Key-exchange reply field: why no certificate is given (string).
pub const CERT_ERROR: &str = "cert_error";
