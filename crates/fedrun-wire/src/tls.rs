//! TLS and mTLS on NVFlare's wire (`stcp://`, `secure_train`), as NVFlare 2.9's Python cells do it.
//!
//! NVFlare wraps the same SFM byte stream in TLS; nothing above the bytes changes. What a
//! fedrun endpoint must match to interoperate, and what this module does:
//!
//! - **credentials** come from a provisioned startup kit ([`TlsCredentials::from_startup_kit`]):
//!   `rootCA.pem`, `server.crt`/`server.key` and/or `client.crt`/`client.key` (RSA keys in
//!   PKCS#1 PEM, as `nvflare provision` writes them), and `customRootCA.pem` if present.
//! - **[`ConnectionSecurity`]**: `clear`, `tls` (only the server proves who it is) or `mtls`
//!   (both do; NVFlare's default when a kit says nothing).
//! - **listener** ([`TlsListener`]): presents the server pair (else the client pair); in mTLS
//!   it requires a client certificate signed by the root CA, in TLS mode it asks for none.
//! - **connector** ([`TlsConnector`]): verifies the server's chain against the root CA
//!   (`customRootCA.pem` in TLS mode when the kit has one) but, like Python's
//!   `check_hostname = False`, not its host name; in mTLS it presents the client pair.
//! - TLS 1.2 is the oldest version either side accepts (NVFlare's `minimum_version`).
//! - **identity** (mTLS only): the name a peer registers in its HELLO/READY must resolve to its
//!   certificate's CN: `server` and `server.<job>` resolve to the server's identity, any other
//!   name to its first segment (`site-1.<job>` → `site-1`). NVFlare closes such a connection
//!   (`BAD_DATA`); so does fedrun, with a log line naming both ([`check_identity`]).

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use fedrun_cell::Fqcn;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::error::WireError;
pub use crate::tls_cert::common_name;

/// The largest credential file read (a PEM certificate chain or key is a few KiB).
const MAX_PEM_FILE: u64 = 1024 * 1024;
/// The identity a client expects of the server when its kit names none (NVFlare's fallback).
pub const DEFAULT_SERVER_IDENTITY: &str = "server";

/// How a connection is secured: NVFlare's `connection_security`.
///
/// # Example
///
/// ```
/// use fedrun_wire::tls::ConnectionSecurity;
///
/// assert_eq!(ConnectionSecurity::parse(None).unwrap(), ConnectionSecurity::Mtls);
/// assert_eq!(ConnectionSecurity::parse(Some("tls")).unwrap(), ConnectionSecurity::Tls);
/// assert!(ConnectionSecurity::parse(Some("ssl")).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionSecurity {
    /// Plain TCP.
    Clear,
    /// TLS: the client verifies the server; the server asks for no client certificate.
    Tls,
    /// Mutual TLS: both present certificates of the same root CA, and names are bound to CNs.
    Mtls,
}

impl ConnectionSecurity {
    /// Parses `clear`, `tls` or `mtls` (case-insensitive); absent means `mtls`, as in NVFlare.
    ///
    /// # Errors
    ///
    /// [`WireError::TlsConfig`] for any other value.
    pub fn parse(value: Option<&str>) -> Result<ConnectionSecurity, WireError> {
        match value.map(str::to_ascii_lowercase).as_deref() {
            None | Some("mtls") => Ok(ConnectionSecurity::Mtls),
            Some("tls") => Ok(ConnectionSecurity::Tls),
            Some("clear") => Ok(ConnectionSecurity::Clear),
            Some(_) => Err(WireError::TlsConfig(
                "connection_security must be clear, tls or mtls".into(),
            )),
        }
    }
}

impl fmt::Display for ConnectionSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectionSecurity::Clear => "clear",
            ConnectionSecurity::Tls => "tls",
            ConnectionSecurity::Mtls => "mtls",
        })
    }
}

/// A certificate chain (end entity first) and its private key.
#[derive(Debug)]
pub struct KeyPair {
    /// The chain, end-entity certificate first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key (PKCS#1, PKCS#8 or SEC1).
    pub key: PrivateKeyDer<'static>,
}

impl Clone for KeyPair {
    fn clone(&self) -> Self {
        KeyPair {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl KeyPair {
    /// Loads a PEM chain and a PEM key.
    ///
    /// # Errors
    ///
    /// [`WireError::TlsFile`] when a file cannot be read, is too big or holds no usable PEM.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<KeyPair, WireError> {
        let chain = load_certs(cert)?;
        let bytes = read_bounded(key)?;
        let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| tls_file(key, e))?;
        Ok(KeyPair { chain, key })
    }

    /// The CN of the end-entity certificate.
    pub fn common_name(&self) -> Option<String> {
        self.chain.first().and_then(|c| common_name(c))
    }
}

/// The TLS credentials of one NVFlare participant.
#[derive(Clone, Debug)]
pub struct TlsCredentials {
    /// `rootCA.pem`: the project's root CA, the anchor of every verification.
    pub root_ca: Vec<CertificateDer<'static>>,
    /// `customRootCA.pem`: the anchor a client uses instead in TLS mode (a server certificate
    /// from a public CA), when the kit has one.
    pub custom_root_ca: Option<Vec<CertificateDer<'static>>>,
    /// `server.crt`/`server.key`, what a listener presents.
    pub server: Option<KeyPair>,
    /// `client.crt`/`client.key`, what a connector presents in mTLS.
    pub client: Option<KeyPair>,
}

impl TlsCredentials {
    /// Reads a startup kit directory: `rootCA.pem` (required), `customRootCA.pem`,
    /// `server.crt`+`server.key` and `client.crt`+`client.key` (each pair when both files exist).
    ///
    /// # Errors
    ///
    /// [`WireError::TlsFile`] for a missing `rootCA.pem` or a file that does not load.
    pub fn from_startup_kit(dir: &Path) -> Result<TlsCredentials, WireError> {
        let pair = |cert: &str, key: &str| {
            let (cert, key) = (dir.join(cert), dir.join(key));
            if cert.is_file() && key.is_file() {
                KeyPair::from_pem_files(&cert, &key).map(Some)
            } else {
                Ok(None)
            }
        };
        let custom = dir.join("customRootCA.pem");
        Ok(TlsCredentials {
            root_ca: load_certs(&dir.join("rootCA.pem"))?,
            custom_root_ca: if custom.is_file() {
                Some(load_certs(&custom)?)
            } else {
                None
            },
            server: pair("server.crt", "server.key")?,
            client: pair("client.crt", "client.key")?,
        })
    }

    /// Credentials from explicit files: the root CA and one pair used both as server and as
    /// client pair.
    ///
    /// # Errors
    ///
    /// [`WireError::TlsFile`] for a file that does not load.
    pub fn from_files(
        root_ca: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<TlsCredentials, WireError> {
        let pair = match (cert, key) {
            (Some(c), Some(k)) => Some(KeyPair::from_pem_files(c, k)?),
            (None, None) => None,
            _ => {
                return Err(WireError::TlsConfig(
                    "a certificate needs its key and a key its certificate".into(),
                ))
            }
        };
        Ok(TlsCredentials {
            root_ca: load_certs(root_ca)?,
            custom_root_ca: None,
            server: pair.clone(),
            client: pair,
        })
    }

    fn roots(&self, certs: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, WireError> {
        let mut roots = RootCertStore::empty();
        for c in certs {
            roots
                .add(c.clone())
                .map_err(|e| WireError::TlsConfig(format!("root CA not usable: {e}")))?;
        }
        Ok(Arc::new(roots))
    }
}

/// The TLS side of a listener: NVFlare's server `ssl` context.
#[derive(Clone, Debug)]
pub struct TlsListener {
    pub(crate) config: Arc<rustls::ServerConfig>,
    pub(crate) security: ConnectionSecurity,
    /// The identity `server` and `server.<job>` names resolve to (the CN of the presented cert).
    pub(crate) server_identity: String,
}

impl TlsListener {
    /// A listener presenting the server pair (the client pair if there is none) that, in mTLS,
    /// requires a client certificate issued by the root CA.
    ///
    /// # Errors
    ///
    /// [`WireError::TlsConfig`] for `clear`, no key pair, or credentials rustls refuses.
    pub fn new(
        creds: &TlsCredentials,
        security: ConnectionSecurity,
    ) -> Result<TlsListener, WireError> {
        if security == ConnectionSecurity::Clear {
            return Err(WireError::TlsConfig(
                "a TLS listener needs connection security tls or mtls".into(),
            ));
        }
        let pair = creds
            .server
            .as_ref()
            .or(creds.client.as_ref())
            .ok_or_else(|| {
                WireError::TlsConfig("a TLS listener needs server.crt and server.key".into())
            })?;
        let server_identity = pair.common_name().ok_or_else(|| {
            WireError::TlsConfig("the listener's certificate has no readable CN".into())
        })?;
        let provider = provider();
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(VERSIONS)
            .map_err(tls_config)?;
        let builder = if security == ConnectionSecurity::Mtls {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(creds.roots(&creds.root_ca)?, provider)
                    .build()
                    .map_err(|e| WireError::TlsConfig(format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(pair.chain.clone(), pair.key.clone_key())
            .map_err(tls_config)?;
        Ok(TlsListener {
            config: Arc::new(config),
            security,
            server_identity,
        })
    }

    /// The connection security this listener enforces.
    pub fn security(&self) -> ConnectionSecurity {
        self.security
    }
}

/// The TLS side of a connector: NVFlare's client `ssl` context plus the check of the server's
/// identity.
#[derive(Clone, Debug)]
pub struct TlsConnector {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) security: ConnectionSecurity,
    /// The identity `server` names resolve to (`servers[0].identity` of `fed_client.json`).
    pub(crate) server_identity: String,
    /// The CN of the certificate this connector presents (mTLS).
    pub(crate) own_identity: Option<String>,
}

impl TlsConnector {
    /// A connector that verifies the server against the root CA (in TLS mode the custom root
    /// CA when the kit has one), without a host name check, and in mTLS presents the client
    /// pair (the server pair if there is none). `server_identity`: the CN the server's
    /// certificate must have in mTLS (`None`: [`DEFAULT_SERVER_IDENTITY`]).
    ///
    /// # Errors
    ///
    /// [`WireError::TlsConfig`] for `clear`, mTLS without a key pair, or credentials rustls
    /// refuses.
    pub fn new(
        creds: &TlsCredentials,
        security: ConnectionSecurity,
        server_identity: Option<&str>,
    ) -> Result<TlsConnector, WireError> {
        let anchors = match (security, &creds.custom_root_ca) {
            (ConnectionSecurity::Clear, _) => {
                return Err(WireError::TlsConfig(
                    "a TLS connector needs connection security tls or mtls".into(),
                ))
            }
            (ConnectionSecurity::Tls, Some(custom)) => custom,
            _ => &creds.root_ca,
        };
        let provider = provider();
        let webpki =
            WebPkiServerVerifier::builder_with_provider(creds.roots(anchors)?, provider.clone())
                .build()
                .map_err(|e| WireError::TlsConfig(format!("server verifier: {e}")))?;
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(VERSIONS)
            .map_err(tls_config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoHostnameVerifier { inner: webpki }));
        let (config, own_identity) = if security == ConnectionSecurity::Mtls {
            let pair = creds
                .client
                .as_ref()
                .or(creds.server.as_ref())
                .ok_or_else(|| {
                    WireError::TlsConfig("mTLS needs client.crt and client.key".into())
                })?;
            let config = builder
                .with_client_auth_cert(pair.chain.clone(), pair.key.clone_key())
                .map_err(tls_config)?;
            (config, pair.common_name())
        } else {
            (builder.with_no_client_auth(), None)
        };
        Ok(TlsConnector {
            config: Arc::new(config),
            security,
            server_identity: server_identity
                .unwrap_or(DEFAULT_SERVER_IDENTITY)
                .to_owned(),
            own_identity,
        })
    }

    /// The connection security this connector uses.
    pub fn security(&self) -> ConnectionSecurity {
        self.security
    }

    /// In mTLS, checks that `own` (the name this endpoint registers) resolves to the CN of the
    /// certificate it presents: the server would close the connection after READY otherwise,
    /// which would look like a network failure. Checked once, before connecting.
    ///
    /// # Errors
    ///
    /// [`WireError::IdentityMismatch`].
    pub fn check_own_name(&self, own: &Fqcn) -> Result<(), WireError> {
        if self.security != ConnectionSecurity::Mtls {
            return Ok(());
        }
        check_identity(own, self.own_identity.as_deref(), &self.server_identity)
    }
}

/// The identity NVFlare expects behind endpoint `name`: `server_identity` for `server` and its
/// jobs, else the first segment of the name (a site's job `site-1.J` is `site-1`).
///
/// # Example
///
/// ```
/// use fedrun_cell::Fqcn;
/// use fedrun_wire::tls::expected_identity;
///
/// let job = Fqcn::job_cell("site-1", "J1").unwrap();
/// assert_eq!(expected_identity(&job, "server1"), "site-1");
/// assert_eq!(expected_identity(&Fqcn::new("server.J1").unwrap(), "server1"), "server1");
/// ```
pub fn expected_identity<'a>(name: &'a Fqcn, server_identity: &'a str) -> &'a str {
    let root = name.root();
    if root == Fqcn::SERVER.as_str() {
        server_identity
    } else {
        root
    }
}

/// Checks that a peer registered as `name` presented a certificate whose CN (`cn`) is the
/// identity NVFlare expects for that name ([`expected_identity`]).
///
/// # Errors
///
/// [`WireError::IdentityMismatch`] naming the endpoint, the CN and the expected identity.
pub fn check_identity(
    name: &Fqcn,
    cn: Option<&str>,
    server_identity: &str,
) -> Result<(), WireError> {
    let expected = expected_identity(name, server_identity);
    if cn == Some(expected) {
        return Ok(());
    }
    Err(WireError::IdentityMismatch {
        name: name.to_string(),
        cn: cn.map(str::to_owned),
        expected: expected.to_owned(),
    })
}

/// The server name given to rustls for `host` (it is used for SNI only: the name is not
/// checked, see [`NoHostnameVerifier`]).
pub(crate) fn server_name(host: &str) -> ServerName<'static> {
    ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into()))
}

/// TLS 1.3 and 1.2: NVFlare's `minimum_version = TLSv1_2`.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config(e: rustls::Error) -> WireError {
    WireError::TlsConfig(e.to_string())
}

fn tls_file(path: &Path, e: impl fmt::Display) -> WireError {
    WireError::TlsFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Reads a credential file, refusing one bigger than [`MAX_PEM_FILE`] before buffering it.
fn read_bounded(path: &Path) -> Result<Vec<u8>, WireError> {
    let file = std::fs::File::open(path).map_err(|e| tls_file(path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| tls_file(path, e))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(tls_file(path, format!("larger than {MAX_PEM_FILE} bytes")));
    }
    Ok(bytes)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, WireError> {
    let bytes = read_bounded(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_file(path, e))?;
    if certs.is_empty() {
        return Err(tls_file(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// webpki's server verification without the host name check: NVFlare's client context sets
/// `check_hostname = False` and connects without a server name, so a kit's server certificate
/// need not name the address a client uses. Only the name error is forgiven: webpki checks
/// the chain, validity and usage before the name, so any other failure still refuses. The
/// server's identity is checked instead by its CN after the handshake ([`check_identity`]).
#[derive(Debug)]
struct NoHostnameVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NoHostnameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
