//! Errors of the secure-message layer: one variant per way a credential, a certificate or an
//! envelope can be refused, each keeping its source error.

use std::path::PathBuf;

/// What went wrong while loading credentials, checking a certificate or sealing/opening an
/// envelope.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecureError {
    /// A credential file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A credential file is larger than any certificate or key of a startup kit.
    #[error("{path} is {size} bytes, above the {limit}-byte limit for a credential file")]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A startup kit's `fed_client.json` / `fed_server.json` is not what NVFlare writes.
    #[error("bad startup kit config {path}: {reason}")]
    BadKitConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The private key is not an RSA private key in PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`).
    #[error("bad private key: {0}")]
    BadPrivateKey(#[source] rsa::pkcs1::Error),
    /// A certificate (PEM or DER) does not parse.
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    /// A PEM block holds no certificate.
    #[error("no certificate in the PEM data")]
    NoCertificate,
    /// A key is not the 2048-bit RSA key NVFlare's fixed envelope layout requires.
    #[error("{what} is a {bits}-bit RSA key; NVFlare's envelope only works with 2048-bit keys")]
    KeySize {
        /// Whose key.
        what: &'static str,
        /// Its size.
        bits: usize,
    },
    /// A certificate's public key is not RSA.
    #[error("certificate public key is not RSA: {0}")]
    NotRsa(String),
    /// The local certificate does not belong to the local private key.
    #[error("the certificate does not match the private key")]
    KeyMismatch,
    /// A certificate does not chain to the root CA (or is expired / not yet valid).
    #[error("certificate of {subject} is not valid under the root CA: {reason}")]
    Untrusted {
        /// The certificate's CN.
        subject: String,
        /// webpki's reason.
        reason: String,
    },
    /// A certificate's CN is not the identity its FQCN resolves to (mTLS identity binding).
    #[error("certificate for {fqcn} has CN {cn:?}, expected {expected:?}")]
    IdentityMismatch {
        /// The cell the certificate was offered for.
        fqcn: String,
        /// The certificate's CN.
        cn: String,
        /// The identity NVFlare's resolver expects.
        expected: String,
    },
    /// No certificate of this cell is known (a key exchange must come first).
    #[error("no certificate known for {0}")]
    UnknownPeer(String),
    /// The certificate cache is full.
    #[error("certificate cache full ({0} cells)")]
    CacheFull(usize),
    /// An envelope shorter than the fixed part (541 bytes).
    #[error("envelope of {len} bytes is shorter than the {min}-byte minimum")]
    TooShort {
        /// Its length.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// An envelope of another format version.
    #[error("envelope version {0:#04x} is not supported (only 0x01)")]
    Version(u8),
    /// The sender's signature does not verify (tampering, or another sender).
    #[error("envelope signature does not verify")]
    BadSignature,
    /// The wrapped AES key cannot be unwrapped with the local key.
    #[error("envelope key cannot be unwrapped")]
    BadKey,
    /// AES-GCM authentication failed.
    #[error("envelope ciphertext does not authenticate")]
    BadCiphertext,
    /// A sender used more distinct wrapped keys than allowed (see the crate docs on timing).
    #[error("{0} sent too many distinct envelope keys")]
    KeyBudget(String),
    /// An RSA or AES operation failed on our side (random source, key size).
    #[error("crypto failure: {0}")]
    Crypto(String),
}
