//! Certificates of cells: parsing (PEM, possibly a chain), the subject CN, the RSA public key,
//! and validation against the federation's root CA.
//!
//! A peer's certificate arrives in a key exchange from the network, so it is hostile input:
//! the PEM is bounded ([`MAX_PEM_LEN`], [`MAX_CHAIN_LEN`]) before it is parsed, and a
//! certificate is only used after it chains to the local `rootCA.pem` (webpki's CA rules, an
//! end entity of any usage since provisioned leaf certificates carry no EKU) at the
//! verification time, which tests inject so that vector certificates never expire.

use std::time::{Duration, SystemTime};

use rsa::pkcs8::DecodePublicKey;
use rsa::PublicKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};
use x509_cert::der::{Decode, Encode};

use crate::error::SecureError;

/// The largest certificate PEM accepted (a provisioned chain is about 1.2 KiB per certificate).
pub const MAX_PEM_LEN: usize = 64 * 1024;
/// The most certificates in one PEM (an end entity and its intermediates).
pub const MAX_CHAIN_LEN: usize = 8;

/// When certificates are checked: now, or a fixed time (tests, replays of captured vectors).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VerifyTime {
    /// The system clock at each check.
    #[default]
    Now,
    /// A fixed time, in seconds since the Unix epoch.
    Fixed(u64),
}

impl VerifyTime {
    pub(crate) fn unix_time(self) -> UnixTime {
        match self {
            VerifyTime::Now => UnixTime::now(),
            VerifyTime::Fixed(secs) => UnixTime::since_unix_epoch(Duration::from_secs(secs)),
        }
    }

    /// The time as a [`SystemTime`].
    pub fn system_time(self) -> SystemTime {
        match self {
            VerifyTime::Now => SystemTime::now(),
            VerifyTime::Fixed(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        }
    }
}

/// Splits a PEM into its certificates (DER), bounded.
///
/// # Errors
///
/// [`SecureError::BadCertificate`] for oversized or malformed PEM,
/// [`SecureError::NoCertificate`] when it holds none.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, SecureError> {
    if pem.len() > MAX_PEM_LEN {
        return Err(SecureError::BadCertificate(format!(
            "PEM of {} bytes, above the {MAX_PEM_LEN}-byte limit",
            pem.len()
        )));
    }
    let mut certs = Vec::new();
    for c in CertificateDer::pem_slice_iter(pem) {
        if certs.len() == MAX_CHAIN_LEN {
            return Err(SecureError::BadCertificate(format!(
                "more than {MAX_CHAIN_LEN} certificates in one PEM"
            )));
        }
        certs.push(c.map_err(|e| SecureError::BadCertificate(format!("PEM: {e:?}")))?);
    }
    if certs.is_empty() {
        return Err(SecureError::NoCertificate);
    }
    Ok(certs)
}

/// A parsed certificate (the first of a PEM chain) with what the cipher needs of it.
#[derive(Clone)]
pub struct CellCert {
    chain: Vec<CertificateDer<'static>>,
    pem: Vec<u8>,
    cn: String,
    public_key: PublicKey,
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for CellCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CellCert")
            .field("cn", &self.cn)
            .field("fingerprint", &hex_prefix(&self.fingerprint))
            .finish()
    }
}

fn hex_prefix(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

impl CellCert {
    /// Parses a certificate PEM (an end entity, optionally followed by intermediates).
    ///
    /// # Errors
    ///
    /// [`SecureError::BadCertificate`], [`SecureError::NoCertificate`],
    /// [`SecureError::NotRsa`].
    pub fn from_pem(pem: &[u8]) -> Result<CellCert, SecureError> {
        let chain = pem_certificates(pem)?;
        let x509 = x509_cert::Certificate::from_der(chain[0].as_ref())
            .map_err(|e| SecureError::BadCertificate(e.to_string()))?;
        let tbs = x509.tbs_certificate();
        let cn = tbs
            .subject()
            .common_name()
            .map_err(|e| SecureError::BadCertificate(format!("subject CN: {e}")))?
            .map(String::from)
            .unwrap_or_default();
        let spki = tbs
            .subject_public_key_info()
            .to_der()
            .map_err(|e| SecureError::BadCertificate(e.to_string()))?;
        let public_key = PublicKey::from_public_key_der(&spki)
            .map_err(|e| SecureError::NotRsa(e.to_string()))?;
        let fingerprint: [u8; 32] = Sha256::digest(chain[0].as_ref()).into();
        Ok(CellCert {
            chain,
            pem: pem.to_vec(),
            cn,
            public_key,
            fingerprint,
        })
    }

    /// The subject's common name (`site-1`, `server1`); empty when the subject has none.
    pub fn cn(&self) -> &str {
        &self.cn
    }

    /// The certificate's RSA public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// SHA-256 of the end-entity certificate's DER.
    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }

    /// The PEM this certificate was read from (what a key exchange sends).
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }

    /// Checks that the certificate chains to one of `roots` at `time` (signatures, validity
    /// periods, CA constraints), with the PEM's further certificates as intermediates.
    ///
    /// # Errors
    ///
    /// [`SecureError::Untrusted`] with webpki's reason.
    pub fn verify_chain(&self, roots: &TrustRoots, time: VerifyTime) -> Result<(), SecureError> {
        let untrusted = |reason: String| SecureError::Untrusted {
            subject: self.cn.clone(),
            reason,
        };
        let ee = webpki::EndEntityCert::try_from(&self.chain[0])
            .map_err(|e| untrusted(format!("{e:?}")))?;
        let anchors = roots
            .certs
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| untrusted(format!("root CA: {e:?}")))?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &self.chain[1..],
            time.unix_time(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| untrusted(format!("{e:?}")))
    }
}

/// The federation's root CA certificates (`rootCA.pem`), the trust anchors of every peer
/// certificate.
#[derive(Clone, Debug)]
pub struct TrustRoots {
    certs: Vec<CertificateDer<'static>>,
    pem: Vec<u8>,
}

impl TrustRoots {
    /// Parses `rootCA.pem`.
    ///
    /// # Errors
    ///
    /// As [`pem_certificates`], and [`SecureError::BadCertificate`] when a certificate cannot
    /// be a trust anchor.
    pub fn from_pem(pem: &[u8]) -> Result<TrustRoots, SecureError> {
        let certs = pem_certificates(pem)?;
        for c in &certs {
            webpki::anchor_from_trusted_cert(c)
                .map_err(|e| SecureError::BadCertificate(format!("root CA: {e:?}")))?;
        }
        Ok(TrustRoots {
            certs,
            pem: pem.to_vec(),
        })
    }

    /// The PEM (sent as `cert_ca_content` in a key exchange).
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }
}
