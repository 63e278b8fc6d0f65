//! [`CellCipher`]: one endpoint's secure-message state — the certificates of peer cells
//! learnt in key exchanges, the AES key used towards each receiver, and the unwrapped keys of
//! each sender — on top of its [`CellCredentials`].
//!
//! Every table is bounded: a full certificate cache refuses new cells, a sender gets a small
//! budget of distinct wrapped keys (an NVFlare sender uses one per receiver for its whole
//! life), so that a peer cannot grow our memory or make us run unbounded private-key
//! operations (see the crate docs on RUSTSEC-2023-0071).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

use crate::cert::CellCert;
use crate::credentials::CellCredentials;
use crate::envelope::{self, check_key_size, Envelope, SealKey, AES_KEY_LEN};
use crate::error::SecureError;

/// The most peer cells whose certificates are kept.
pub const MAX_PEERS: usize = 4096;
/// The most distinct wrapped keys one sender certificate may make us unwrap.
pub const MAX_KEYS_PER_SENDER: usize = 16;

type Fingerprint = [u8; 32];

#[derive(Default)]
struct State {
    /// FQCN → certificate (validated, identity-checked).
    peers: HashMap<String, Arc<CellCert>>,
    /// receiver certificate → the AES key we seal with.
    seal_keys: HashMap<Fingerprint, SealKey>,
    /// (sender certificate, SHA-256 of key_enc) → unwrapped AES key.
    open_keys: HashMap<(Fingerprint, Fingerprint), [u8; AES_KEY_LEN]>,
    /// sender certificate → distinct keys unwrapped.
    unwrapped: HashMap<Fingerprint, usize>,
}

/// One endpoint's secure-message cipher.
///
/// # Example
///
/// ```no_run
/// use fedrun_secure::{CellCipher, CellCredentials};
///
/// let site1 = CellCipher::new(CellCredentials::from_startup_kit("site-1/startup").unwrap());
/// let site2 = CellCipher::new(CellCredentials::from_startup_kit("site-2/startup").unwrap());
/// // the key exchange: each side learns the other's certificate
/// site1.accept_peer("site-2.J1", site2.credentials().cert().pem()).unwrap();
/// site2.accept_peer("site-1.J1", site1.credentials().cert().pem()).unwrap();
/// let env = site1.encrypt_for("site-2.J1", b"secret").unwrap();
/// assert_eq!(site2.decrypt_from("site-1.J1", &env).unwrap(), b"secret");
/// ```
pub struct CellCipher {
    creds: Arc<CellCredentials>,
    state: Mutex<State>,
}

impl std::fmt::Debug for CellCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CellCipher")
            .field("identity", &self.creds.identity())
            .field("peers", &self.lock().peers.len())
            .finish()
    }
}

impl CellCipher {
    /// A cipher with no peer known yet.
    pub fn new(creds: impl Into<Arc<CellCredentials>>) -> CellCipher {
        CellCipher {
            creds: creds.into(),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The local credentials.
    pub fn credentials(&self) -> &CellCredentials {
        &self.creds
    }

    /// The certificate known for `fqcn`, if any.
    pub fn peer(&self, fqcn: &str) -> Option<Arc<CellCert>> {
        self.lock().peers.get(fqcn).cloned()
    }

    /// Checks a certificate offered for `fqcn` in a key exchange and remembers it: it must
    /// parse, hold a 2048-bit RSA key, carry the CN `fqcn` resolves to (when identity binding
    /// is on) and chain to the root CA at the verification time. A later certificate for the
    /// same cell replaces the earlier one.
    ///
    /// # Errors
    ///
    /// Certificate errors, [`SecureError::IdentityMismatch`], [`SecureError::Untrusted`],
    /// [`SecureError::CacheFull`].
    pub fn accept_peer(&self, fqcn: &str, pem: &[u8]) -> Result<Arc<CellCert>, SecureError> {
        let cert = CellCert::from_pem(pem)?;
        check_key_size(cert.public_key(), "the peer certificate's key")?;
        if self.creds.enforces_identity() {
            let expected = self.creds.resolver().resolve(fqcn);
            if cert.cn() != expected {
                return Err(SecureError::IdentityMismatch {
                    fqcn: fqcn.to_owned(),
                    cn: cert.cn().to_owned(),
                    expected,
                });
            }
        }
        cert.verify_chain(self.creds.roots(), self.creds.verify_time())?;
        let cert = Arc::new(cert);
        let mut state = self.lock();
        if state.peers.len() >= MAX_PEERS && !state.peers.contains_key(fqcn) {
            return Err(SecureError::CacheFull(MAX_PEERS));
        }
        state.peers.insert(fqcn.to_owned(), Arc::clone(&cert));
        Ok(cert)
    }

    /// Seals `clear` for the cell `fqcn` (whose certificate must be known), with the AES key
    /// kept for that certificate (made on first use).
    ///
    /// # Errors
    ///
    /// [`SecureError::UnknownPeer`], and sealing errors.
    pub fn encrypt_for(&self, fqcn: &str, clear: &[u8]) -> Result<Vec<u8>, SecureError> {
        let cert = self
            .peer(fqcn)
            .ok_or_else(|| SecureError::UnknownPeer(fqcn.to_owned()))?;
        let existing = self.lock().seal_keys.get(cert.fingerprint()).cloned();
        let key = match existing {
            Some(k) => k,
            None => {
                // the RSA operation runs outside the lock; a race makes two keys, one is kept
                let k = SealKey::new(cert.public_key())?;
                self.lock()
                    .seal_keys
                    .entry(*cert.fingerprint())
                    .or_insert(k)
                    .clone()
            }
        };
        envelope::seal(self.creds.private_key(), &key, clear)
    }

    /// Opens an envelope from the cell `fqcn` (whose certificate must be known): verifies the
    /// sender's signature first, unwraps its AES key only the first time this key is seen
    /// (within the sender's budget), then authenticates and decrypts.
    ///
    /// # Errors
    ///
    /// [`SecureError::UnknownPeer`], [`SecureError::KeyBudget`], and the envelope errors.
    pub fn decrypt_from(&self, fqcn: &str, bytes: &[u8]) -> Result<Vec<u8>, SecureError> {
        let cert = self
            .peer(fqcn)
            .ok_or_else(|| SecureError::UnknownPeer(fqcn.to_owned()))?;
        let env = Envelope::parse(bytes)?;
        env.verify(cert.public_key())?;
        let id = (*cert.fingerprint(), Sha256::digest(env.key_enc()).into());
        let known = self.lock().open_keys.get(&id).copied();
        let key = match known {
            Some(k) => k,
            None => {
                {
                    let state = self.lock();
                    if state.unwrapped.get(&id.0).copied().unwrap_or(0) >= MAX_KEYS_PER_SENDER {
                        return Err(SecureError::KeyBudget(fqcn.to_owned()));
                    }
                }
                let k = env.unwrap_key(self.creds.private_key())?;
                let mut state = self.lock();
                if state.open_keys.insert(id, k).is_none() {
                    *state.unwrapped.entry(id.0).or_insert(0) += 1;
                }
                k
            }
        };
        env.decrypt(&key)
    }
}
