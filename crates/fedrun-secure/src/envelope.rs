//! NVFlare 2.9's secure-message envelope (`cn__secure` payloads), byte for byte.
//!
//! A secure message's payload is replaced by an envelope that only its receiver can open and
//! only its sender can have made:
//!
//! ```text
//! offset  size  field
//! 0       1     version 0x01
//! 1       12    nonce (random per message)
//! 13      256   key_enc: RSA-OAEP (SHA-256, MGF1-SHA-256, no label) of the 32-byte AES key,
//!               under the receiver's certificate key
//! 269     256   signature: RSA-PSS (SHA-256, MGF1-SHA-256, salt 222) by the sender's key
//!               over version | nonce | key_enc | ciphertext
//! 525     n+16  AES-256-GCM(aes key, nonce, cleartext, AAD = version | key_enc)
//! ```
//!
//! The fixed lengths make the format work with 2048-bit RSA keys only, which is what
//! `nvflare provision` generates. Opening checks, in this order and before any private-key
//! operation: the length, the version, the sender's signature; only then is `key_enc`
//! unwrapped and the ciphertext authenticated.
//!
//! The sender signs with a salt of 222 bytes (the maximum for a 2048-bit key, as NVFlare's
//! `cryptography` code does); the verifier detects the salt length, so that any PSS signature
//! of the sender verifies.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rsa::signature::{RandomizedSigner, SignatureEncoding, Verifier};
use rsa::traits::PublicKeyParts;
use rsa::{pss, PrivateKey, PublicKey};
use sha2::Sha256;

use crate::error::SecureError;

/// The envelope format version (NVFlare 2.9's `CELL_CIPHER_VERSION`).
pub const VERSION: u8 = 0x01;
/// Bytes of the AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Bytes of the wrapped AES key (a 2048-bit RSA block).
pub const KEY_ENC_LEN: usize = 256;
/// Bytes of the signature (a 2048-bit RSA block).
pub const SIGNATURE_LEN: usize = 256;
/// Bytes of the AES-GCM tag at the end of the ciphertext.
pub const TAG_LEN: usize = 16;
/// Bytes of the AES-256 key.
pub const AES_KEY_LEN: usize = 32;
/// Bytes an envelope adds to its cleartext; also the shortest envelope (an empty cleartext).
pub const OVERHEAD: usize = 1 + NONCE_LEN + KEY_ENC_LEN + SIGNATURE_LEN + TAG_LEN;
/// The PSS salt length a sender signs with (2048-bit key: 256 − 32 − 2).
pub const SIGN_SALT_LEN: usize = 222;
/// The RSA modulus size the envelope layout fixes, in bits.
pub const RSA_BITS: usize = 2048;

const SIG_START: usize = 1 + NONCE_LEN + KEY_ENC_LEN;
const CT_START: usize = SIG_START + SIGNATURE_LEN;

/// Checks that `key` is a 2048-bit RSA key (what the fixed lengths need).
///
/// # Errors
///
/// [`SecureError::KeySize`].
pub fn check_key_size(key: &PublicKey, what: &'static str) -> Result<(), SecureError> {
    let bits = key.size() * 8;
    if key.size() != KEY_ENC_LEN {
        return Err(SecureError::KeySize { what, bits });
    }
    Ok(())
}

/// The AES key a sender uses for one receiver, with its wrapped form. NVFlare picks one per
/// receiver certificate and reuses it (only the nonce changes) for the sender's lifetime.
#[derive(Clone)]
pub struct SealKey {
    aes_key: [u8; AES_KEY_LEN],
    key_enc: Vec<u8>,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey").finish_non_exhaustive()
    }
}

impl SealKey {
    /// A fresh random AES key wrapped under `receiver` (RSA-OAEP-SHA-256).
    ///
    /// # Errors
    ///
    /// [`SecureError::KeySize`] for a receiver key that is not 2048 bits,
    /// [`SecureError::Crypto`] when the random source or the encryption fails.
    pub fn new(receiver: &PublicKey) -> Result<SealKey, SecureError> {
        check_key_size(receiver, "the receiver's key")?;
        let mut aes_key = [0u8; AES_KEY_LEN];
        fill_random(&mut aes_key)?;
        let key_enc = receiver
            .oaep_encrypt_with_rng::<Sha256, _>(&mut rand::rng(), &aes_key)
            .map_err(|e| SecureError::Crypto(format!("RSA-OAEP: {e}")))?;
        SealKey::from_parts(aes_key, key_enc)
    }

    /// A key from its parts (tests, and known-answer vectors).
    ///
    /// # Errors
    ///
    /// [`SecureError::Crypto`] when `key_enc` is not [`KEY_ENC_LEN`] bytes.
    pub fn from_parts(
        aes_key: [u8; AES_KEY_LEN],
        key_enc: Vec<u8>,
    ) -> Result<SealKey, SecureError> {
        if key_enc.len() != KEY_ENC_LEN {
            return Err(SecureError::Crypto(format!(
                "wrapped key of {} bytes, expected {KEY_ENC_LEN}",
                key_enc.len()
            )));
        }
        Ok(SealKey { aes_key, key_enc })
    }

    /// The wrapped key as it appears in every envelope sealed with this key.
    pub fn key_enc(&self) -> &[u8] {
        &self.key_enc
    }
}

fn fill_random(buf: &mut [u8]) -> Result<(), SecureError> {
    use rand::TryRng;
    rand::rng()
        .try_fill_bytes(buf)
        .map_err(|e| SecureError::Crypto(format!("random source: {e}")))
}

/// Seals `clear` for the receiver of `key`, signed with `sender`'s private key.
///
/// # Errors
///
/// [`SecureError::Crypto`] when the random source, AES-GCM or the signature fails.
pub fn seal(sender: &PrivateKey, key: &SealKey, clear: &[u8]) -> Result<Vec<u8>, SecureError> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce)?;
    seal_with_nonce(sender, key, &nonce, clear)
}

/// [`seal`] with a given nonce (known-answer tests). A nonce must never repeat under one key.
///
/// # Errors
///
/// As [`seal`].
pub fn seal_with_nonce(
    sender: &PrivateKey,
    key: &SealKey,
    nonce: &[u8; NONCE_LEN],
    clear: &[u8],
) -> Result<Vec<u8>, SecureError> {
    let mut aad = Vec::with_capacity(1 + KEY_ENC_LEN);
    aad.push(VERSION);
    aad.extend_from_slice(&key.key_enc);
    let cipher = Aes256Gcm::new_from_slice(&key.aes_key)
        .map_err(|e| SecureError::Crypto(format!("AES key: {e}")))?;
    let ct = cipher
        .encrypt(
            &Nonce::from(*nonce),
            Payload {
                msg: clear,
                aad: &aad,
            },
        )
        .map_err(|e| SecureError::Crypto(format!("AES-GCM: {e}")))?;
    let mut out = Vec::with_capacity(OVERHEAD + clear.len());
    out.push(VERSION);
    out.extend_from_slice(nonce);
    out.extend_from_slice(&key.key_enc);
    let mut signed = Vec::with_capacity(SIG_START + ct.len());
    signed.extend_from_slice(&out);
    signed.extend_from_slice(&ct);
    let signer = pss::SigningKey::<Sha256>::new_with_salt_len(sender.clone(), SIGN_SALT_LEN);
    let sig = signer
        .try_sign_with_rng(&mut rand::rng(), &signed)
        .map_err(|e| SecureError::Crypto(format!("RSA-PSS: {e}")))?
        .to_vec();
    if sig.len() != SIGNATURE_LEN {
        return Err(SecureError::KeySize {
            what: "the local key",
            bits: sig.len() * 8,
        });
    }
    out.extend_from_slice(&sig);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// The fields of an envelope, borrowed from its bytes. [`Envelope::parse`] checks only the
/// length and the version; [`Envelope::verify`] the signature; [`Envelope::unwrap_key`] and
/// [`Envelope::decrypt`] do the rest.
///
/// # Example
///
/// ```
/// use fedrun_secure::envelope::{Envelope, OVERHEAD};
///
/// assert!(Envelope::parse(&[1u8; 100]).is_err(), "shorter than the fixed part");
/// let mut bytes = vec![0u8; OVERHEAD];
/// assert!(Envelope::parse(&bytes).is_err(), "version 0");
/// bytes[0] = 1;
/// let env = Envelope::parse(&bytes).unwrap();
/// assert_eq!(env.ciphertext().len(), 16, "the tag of an empty cleartext");
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    bytes: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Checks the length (at least [`OVERHEAD`]) and the version.
    ///
    /// # Errors
    ///
    /// [`SecureError::TooShort`], [`SecureError::Version`].
    pub fn parse(bytes: &'a [u8]) -> Result<Envelope<'a>, SecureError> {
        if bytes.len() < OVERHEAD {
            return Err(SecureError::TooShort {
                len: bytes.len(),
                min: OVERHEAD,
            });
        }
        if bytes[0] != VERSION {
            return Err(SecureError::Version(bytes[0]));
        }
        Ok(Envelope { bytes })
    }

    /// The nonce.
    pub fn nonce(&self) -> &'a [u8] {
        &self.bytes[1..1 + NONCE_LEN]
    }

    /// The wrapped AES key.
    pub fn key_enc(&self) -> &'a [u8] {
        &self.bytes[1 + NONCE_LEN..SIG_START]
    }

    /// The sender's signature.
    pub fn signature(&self) -> &'a [u8] {
        &self.bytes[SIG_START..CT_START]
    }

    /// The AES-GCM ciphertext with its tag.
    pub fn ciphertext(&self) -> &'a [u8] {
        &self.bytes[CT_START..]
    }

    /// Length of the cleartext inside.
    pub fn clear_len(&self) -> usize {
        self.bytes.len() - OVERHEAD
    }

    /// Verifies the sender's RSA-PSS signature (any salt length) over
    /// version | nonce | key_enc | ciphertext.
    ///
    /// # Errors
    ///
    /// [`SecureError::BadSignature`].
    pub fn verify(&self, sender: &PublicKey) -> Result<(), SecureError> {
        let sig =
            pss::Signature::try_from(self.signature()).map_err(|_| SecureError::BadSignature)?;
        let mut signed = Vec::with_capacity(self.bytes.len() - SIGNATURE_LEN);
        signed.extend_from_slice(&self.bytes[..SIG_START]);
        signed.extend_from_slice(self.ciphertext());
        pss::VerifyingKey::<Sha256>::new_with_auto_salt_len(sender.clone())
            .verify(&signed, &sig)
            .map_err(|_| SecureError::BadSignature)
    }

    /// Unwraps the AES key with the receiver's private key (RSA-OAEP-SHA-256). Call only after
    /// [`Envelope::verify`]: this is the private-key operation a timing attacker would want to
    /// drive (see the crate docs).
    ///
    /// # Errors
    ///
    /// [`SecureError::BadKey`] when the block does not unwrap to a 32-byte key.
    pub fn unwrap_key(&self, receiver: &PrivateKey) -> Result<[u8; AES_KEY_LEN], SecureError> {
        let key = receiver
            .oaep_decrypt_with_rng::<Sha256, _>(&mut rand::rng(), self.key_enc())
            .map_err(|_| SecureError::BadKey)?;
        <[u8; AES_KEY_LEN]>::try_from(key.as_slice()).map_err(|_| SecureError::BadKey)
    }

    /// Authenticates and decrypts the ciphertext with the unwrapped key (AAD = version |
    /// key_enc).
    ///
    /// # Errors
    ///
    /// [`SecureError::BadCiphertext`].
    pub fn decrypt(&self, aes_key: &[u8; AES_KEY_LEN]) -> Result<Vec<u8>, SecureError> {
        let cipher = Aes256Gcm::new_from_slice(aes_key).map_err(|_| SecureError::BadCiphertext)?;
        let nonce = Nonce::try_from(self.nonce()).map_err(|_| SecureError::BadCiphertext)?;
        let mut full_aad = Vec::with_capacity(1 + KEY_ENC_LEN);
        full_aad.push(VERSION);
        full_aad.extend_from_slice(self.key_enc());
        cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: self.ciphertext(),
                    aad: &full_aad,
                },
            )
            .map_err(|_| SecureError::BadCiphertext)
    }
}

/// Opens an envelope in one go: parse, verify with `sender`, unwrap with `receiver`, decrypt.
///
/// # Errors
///
/// Any of [`Envelope`]'s errors.
pub fn open(
    sender: &PublicKey,
    receiver: &PrivateKey,
    bytes: &[u8],
) -> Result<Vec<u8>, SecureError> {
    let env = Envelope::parse(bytes)?;
    env.verify(sender)?;
    let key = env.unwrap_key(receiver)?;
    env.decrypt(&key)
}
