//! A cell's credentials for secure messages: its RSA private key (PKCS#1 PEM, as `nvflare
//! provision` writes `client.key` / `server.key`), its certificate, the federation's root CA,
//! and how peer certificates are bound to cell names.
//!
//! Files are bounded ([`MAX_FILE_LEN`]) before they are read, the key and the certificate must
//! belong together, and both must be 2048-bit RSA (the envelope's fixed layout).

use std::io::Read;
use std::path::{Path, PathBuf};

use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::PrivateKey;

use crate::cert::{CellCert, TrustRoots, VerifyTime};
use crate::envelope::check_key_size;
use crate::error::SecureError;
use crate::identity::IdentityResolver;

/// The largest credential or kit config file read.
pub const MAX_FILE_LEN: u64 = 256 * 1024;

/// A cell's own key and certificate, the root CA, and the identity rules for peers.
///
/// # Example
///
/// ```no_run
/// use fedrun_secure::CellCredentials;
///
/// // an NVFlare startup kit: rootCA.pem, client.crt, client.key, fed_client.json
/// let creds = CellCredentials::from_startup_kit("/opt/site-1/startup").unwrap();
/// assert_eq!(creds.identity(), "site-1");
/// ```
#[derive(Clone)]
pub struct CellCredentials {
    key: PrivateKey,
    cert: CellCert,
    roots: TrustRoots,
    resolver: IdentityResolver,
    enforce_identity: bool,
    verify_time: VerifyTime,
}

impl std::fmt::Debug for CellCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CellCredentials")
            .field("cert", &self.cert)
            .field("enforce_identity", &self.enforce_identity)
            .field("resolver", &self.resolver)
            .field("verify_time", &self.verify_time)
            .finish_non_exhaustive()
    }
}

/// Two credentials are equal when they are the same certificate under the same root with the
/// same rules (the key belongs to the certificate, see [`CellCredentials::from_pem`]).
impl PartialEq for CellCredentials {
    fn eq(&self, other: &Self) -> bool {
        self.cert.fingerprint() == other.cert.fingerprint()
            && self.roots.pem() == other.roots.pem()
            && self.resolver == other.resolver
            && self.enforce_identity == other.enforce_identity
            && self.verify_time == other.verify_time
    }
}

impl Eq for CellCredentials {}

impl CellCredentials {
    /// Credentials from PEM texts: the private key (PKCS#1 `RSA PRIVATE KEY`), the cell's
    /// certificate and the root CA. Identity binding is on (NVFlare's `mtls` default) with a
    /// resolver that maps every name to its first segment; see
    /// [`CellCredentials::with_resolver`].
    ///
    /// # Errors
    ///
    /// [`SecureError::BadPrivateKey`], certificate errors, [`SecureError::KeySize`],
    /// [`SecureError::KeyMismatch`].
    pub fn from_pem(
        key_pem: &str,
        cert_pem: &[u8],
        root_pem: &[u8],
    ) -> Result<CellCredentials, SecureError> {
        let key = PrivateKey::from_pkcs1_pem(key_pem).map_err(SecureError::BadPrivateKey)?;
        let cert = CellCert::from_pem(cert_pem)?;
        check_key_size(cert.public_key(), "the local certificate's key")?;
        if key.to_public_key() != *cert.public_key() {
            return Err(SecureError::KeyMismatch);
        }
        let roots = TrustRoots::from_pem(root_pem)?;
        Ok(CellCredentials {
            key,
            cert,
            roots,
            resolver: IdentityResolver::new(),
            enforce_identity: true,
            verify_time: VerifyTime::Now,
        })
    }

    /// Credentials from an NVFlare startup kit directory, as NVFlare's cells pick them: the
    /// root CA from `rootCA.pem` (or the `ssl_root_cert` of `fed_client.json`), the local pair
    /// `server.crt`/`server.key` when present, else `client.crt`/`client.key` (or the
    /// `ssl_cert`/`ssl_private_key` of `fed_client.json`). With a `fed_client.json`, peers
    /// named `server…` must present `servers[0].identity` (default `server`), and identity
    /// binding is on unless `client.connection_security` is `tls` or `clear`; a server kit
    /// (`fed_server.json`) maps `server` to its own certificate's CN.
    ///
    /// # Errors
    ///
    /// File, config, key and certificate errors.
    pub fn from_startup_kit(dir: impl AsRef<Path>) -> Result<CellCredentials, SecureError> {
        CellCredentials::from_startup_kit_with(dir, "fed_client.json")
    }

    /// [`CellCredentials::from_startup_kit`] with the client config file named `fed_client`
    /// (NVFlare's job process is given its name with `-s`).
    ///
    /// # Errors
    ///
    /// As [`CellCredentials::from_startup_kit`].
    pub fn from_startup_kit_with(
        dir: impl AsRef<Path>,
        fed_client: &str,
    ) -> Result<CellCredentials, SecureError> {
        let dir = dir.as_ref();
        let client_cfg = dir.join(fed_client);
        let server_cfg = dir.join("fed_server.json");
        let mut files = KitFiles {
            root: dir.join("rootCA.pem"),
            cert: dir.join("client.crt"),
            key: dir.join("client.key"),
        };
        let mut server_identity = None;
        let mut enforce = true;
        let is_client = client_cfg.exists();
        if is_client {
            let cfg = read_json(&client_cfg)?;
            let client = cfg.get("client");
            let path_of = |k: &str| {
                client
                    .and_then(|c| c.get(k))
                    .and_then(|v| v.as_str())
                    .map(|p| dir.join(p))
            };
            files.root = path_of("ssl_root_cert").unwrap_or(files.root);
            files.cert = path_of("ssl_cert").unwrap_or(files.cert);
            files.key = path_of("ssl_private_key").unwrap_or(files.key);
            enforce = !matches!(
                client
                    .and_then(|c| c.get("connection_security"))
                    .and_then(|v| v.as_str()),
                Some("tls" | "clear")
            );
            server_identity = Some(
                cfg.get("servers")
                    .and_then(|s| s.get(0))
                    .and_then(|s| s.get("identity"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("server")
                    .to_owned(),
            );
        }
        // NVFlare uses a server pair found next to the root CA in preference
        let server_crt = dir.join("server.crt");
        let server_key = dir.join("server.key");
        if server_crt.exists() && server_key.exists() {
            files.cert = server_crt;
            files.key = server_key;
        }
        let key = String::from_utf8(read_bounded(&files.key)?).map_err(|_| {
            SecureError::BadKitConfig {
                path: files.key.clone(),
                reason: "not UTF-8 PEM".into(),
            }
        })?;
        let creds = CellCredentials::from_pem(
            &key,
            &read_bounded(&files.cert)?,
            &read_bounded(&files.root)?,
        )?;
        let resolver = match server_identity {
            Some(id) => IdentityResolver::for_client(&id),
            None if server_cfg.exists() => IdentityResolver::for_client(creds.identity()),
            None => IdentityResolver::new(),
        };
        Ok(creds.with_resolver(resolver).with_identity_binding(enforce))
    }

    /// Uses `resolver` for the identity binding of peer certificates.
    pub fn with_resolver(mut self, resolver: IdentityResolver) -> CellCredentials {
        self.resolver = resolver;
        self
    }

    /// Turns the CN ↔ cell-name binding on (`mtls`, the default) or off (`tls`).
    pub fn with_identity_binding(mut self, enforce: bool) -> CellCredentials {
        self.enforce_identity = enforce;
        self
    }

    /// Checks certificates at a fixed time instead of now (tests and captured vectors, whose
    /// certificates expire).
    pub fn with_verify_time(mut self, time: VerifyTime) -> CellCredentials {
        self.verify_time = time;
        self
    }

    /// The local certificate's CN (the site or server name).
    pub fn identity(&self) -> &str {
        self.cert.cn()
    }

    /// The local certificate.
    pub fn cert(&self) -> &CellCert {
        &self.cert
    }

    /// The root CA.
    pub fn roots(&self) -> &TrustRoots {
        &self.roots
    }

    /// The identity rules for peers.
    pub fn resolver(&self) -> &IdentityResolver {
        &self.resolver
    }

    /// Whether peer certificates must match their cell's identity.
    pub fn enforces_identity(&self) -> bool {
        self.enforce_identity
    }

    /// When certificates are checked.
    pub fn verify_time(&self) -> VerifyTime {
        self.verify_time
    }

    pub(crate) fn private_key(&self) -> &PrivateKey {
        &self.key
    }
}

struct KitFiles {
    root: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, SecureError> {
    let read_err = |source| SecureError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size > MAX_FILE_LEN {
        return Err(SecureError::FileTooLarge {
            path: path.to_owned(),
            size,
            limit: MAX_FILE_LEN,
        });
    }
    let mut buf = Vec::with_capacity(size as usize);
    // the file may grow between metadata and read: never read past the limit
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    if buf.len() as u64 > MAX_FILE_LEN {
        return Err(SecureError::FileTooLarge {
            path: path.to_owned(),
            size: buf.len() as u64,
            limit: MAX_FILE_LEN,
        });
    }
    Ok(buf)
}

fn read_json(path: &Path) -> Result<serde_json::Value, SecureError> {
    serde_json::from_slice(&read_bounded(path)?).map_err(|e| SecureError::BadKitConfig {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}
