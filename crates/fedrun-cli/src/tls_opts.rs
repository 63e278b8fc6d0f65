//! The TLS options of `fedrun server` and `fedrun client`, and the NVFlare rule that turns them
//! into clear TCP, TLS or mTLS.
//!
//! Credentials come from a provisioned startup kit (`--tls-kit DIR`: `rootCA.pem` with
//! `server.crt`/`server.key` or `client.crt`/`client.key`, as `nvflare provision` writes
//! them) or from explicit files (`--ca`, `--cert`, `--key`). As in NVFlare, credentials
//! mean TLS even on a `tcp://` address unless `--connection-security clear` says otherwise;
//! their mode is `--connection-security` (`mtls` when not given); `stcp://` without
//! credentials, or a TLS mode without them, is an error, never a silent clear connection.

use std::path::PathBuf;

use fedrun_wire::tls::{ConnectionSecurity, TlsConnector, TlsCredentials, TlsListener};

use crate::error::CliError;

/// TLS options (all off by default: clear TCP).
///
/// # Example
///
/// ```
/// use fedrun_cli::tls_opts::TlsOptions;
///
/// // no credentials, a tcp:// address: clear TCP
/// assert!(TlsOptions::default().listener(false).unwrap().is_none());
/// // stcp:// without credentials is refused
/// assert!(TlsOptions::default().listener(true).is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct TlsOptions {
    /// A startup kit folder as `nvflare provision` writes it: rootCA.pem and server.crt/key
    /// (server) or client.crt/key (client). Means TLS, even on a tcp:// address.
    #[arg(long, value_name = "DIR", conflicts_with = "ca")]
    pub tls_kit: Option<PathBuf>,
    /// The root CA certificate (PEM) that signs every peer's certificate.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This endpoint's certificate (PEM), with --ca.
    #[arg(long, value_name = "FILE", requires = "key", requires = "ca")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM, PKCS#1 or PKCS#8).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// clear, tls (only the server is authenticated) or mtls (both; the default with
    /// credentials).
    #[arg(long, value_name = "MODE")]
    pub connection_security: Option<String>,
    /// Client: the CN the server's certificate must have in mTLS (NVFlare's
    /// `servers[0].identity`, the server's name in project.yml) [default: server].
    #[arg(long, value_name = "CN")]
    pub server_identity: Option<String>,
}

impl TlsOptions {
    /// The credentials and mode to use, `None` for clear TCP. `secure_scheme`: the address
    /// said `stcp://`.
    fn resolve(
        &self,
        option: &'static str,
        secure_scheme: bool,
    ) -> Result<Option<(TlsCredentials, ConnectionSecurity)>, CliError> {
        let bad = |reason: String| CliError::BadOption { option, reason };
        let security = ConnectionSecurity::parse(self.connection_security.as_deref())
            .map_err(|e| bad(format!("--connection-security: {e}")))?;
        let creds = match (&self.tls_kit, &self.ca) {
            (Some(kit), _) => Some(TlsCredentials::from_startup_kit(kit)),
            (None, Some(ca)) => Some(TlsCredentials::from_files(
                ca,
                self.cert.as_deref(),
                self.key.as_deref(),
            )),
            (None, None) => None,
        }
        .transpose()
        .map_err(|e| bad(e.to_string()))?;
        match (creds, security) {
            (None, ConnectionSecurity::Clear) | (Some(_), ConnectionSecurity::Clear)
                if !secure_scheme =>
            {
                Ok(None)
            }
            (_, ConnectionSecurity::Clear) => Err(bad(
                "stcp:// means TLS but --connection-security is clear".to_owned(),
            )),
            (None, _) if secure_scheme || self.connection_security.is_some() => Err(bad(
                "TLS needs credentials: --tls-kit DIR, or --ca FILE (with --cert/--key)".to_owned(),
            )),
            (None, _) => Ok(None),
            (Some(creds), security) => Ok(Some((creds, security))),
        }
    }

    /// The TLS side of a listener, `None` for clear TCP.
    ///
    /// # Errors
    ///
    /// [`CliError::BadOption`] (`listen`) for credentials that do not load or do not fit the
    /// mode, `stcp://` without credentials, or a TLS mode without them.
    pub fn listener(&self, secure_scheme: bool) -> Result<Option<TlsListener>, CliError> {
        let Some((creds, security)) = self.resolve("listen", secure_scheme)? else {
            return Ok(None);
        };
        TlsListener::new(&creds, security)
            .map(Some)
            .map_err(|e| CliError::BadOption {
                option: "listen",
                reason: e.to_string(),
            })
    }

    /// The TLS side of a connector, `None` for clear TCP.
    ///
    /// # Errors
    ///
    /// As [`TlsOptions::listener`], naming `server`.
    pub fn connector(&self, secure_scheme: bool) -> Result<Option<TlsConnector>, CliError> {
        let Some((creds, security)) = self.resolve("server", secure_scheme)? else {
            return Ok(None);
        };
        TlsConnector::new(&creds, security, self.server_identity.as_deref())
            .map(Some)
            .map_err(|e| CliError::BadOption {
                option: "server",
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_tls_mode_without_credentials_or_stcp_with_clear_is_refused() {
        let tls = TlsOptions {
            connection_security: Some("tls".into()),
            ..TlsOptions::default()
        };
        assert!(tls.listener(false).is_err());
        let clear = TlsOptions {
            connection_security: Some("clear".into()),
            ..TlsOptions::default()
        };
        assert!(clear.listener(false).unwrap().is_none());
        assert!(clear.listener(true).is_err());
        let bad = TlsOptions {
            connection_security: Some("ssl".into()),
            ..TlsOptions::default()
        };
        assert!(bad.connector(false).is_err());
    }

    #[test]
    fn a_kit_that_does_not_load_names_the_file() {
        let kit = TlsOptions {
            tls_kit: Some("/nonexistent-fedrun-kit".into()),
            ..TlsOptions::default()
        };
        let err = kit.connector(false).unwrap_err().to_string();
        assert!(err.contains("rootCA.pem"), "{err}");
    }

    /// Writes a CA and kits `server1` (server pair) and `site-1` (client pair) under `dir`.
    pub(crate) fn kits(dir: &std::path::Path) -> (PathBuf, PathBuf) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut ca = CertificateParams::new(vec!["p".to_owned()]).unwrap();
        ca.distinguished_name.push(DnType::CommonName, "p");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let write = |name: &str, role: &str| {
            let folder = dir.join(name);
            std::fs::create_dir_all(&folder).unwrap();
            let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
            std::fs::write(folder.join("rootCA.pem"), ca_cert.pem()).unwrap();
            std::fs::write(folder.join(format!("{role}.crt")), cert.pem()).unwrap();
            std::fs::write(folder.join(format!("{role}.key")), key.serialize_pem()).unwrap();
            folder
        };
        (write("server1", "server"), write("site-1", "client"))
    }

    #[actix::test]
    async fn server_and_client_kits_connect_over_mtls_and_a_site_cannot_use_another_sites_kit() {
        use crate::transport::{connect_client_with, listen_server_with};
        let dir = std::env::temp_dir().join(format!("fedrun-cli-tls-{}", std::process::id()));
        let (server_kit, site_kit) = kits(&dir);
        let server = TlsOptions {
            tls_kit: Some(server_kit),
            ..TlsOptions::default()
        };
        let (net, addr) = listen_server_with("127.0.0.1:0", &server).await.unwrap();
        let client = TlsOptions {
            tls_kit: Some(site_kit),
            server_identity: Some("server1".into()),
            ..TlsOptions::default()
        };
        let timeout = std::time::Duration::from_secs(10);
        let url = format!("stcp://{addr}");
        let job = connect_client_with(&url, "site-1", "j1", timeout, &client)
            .await
            .unwrap();
        assert!(net.is_connected(&fedrun_cell::Fqcn::new("site-1.j1").unwrap()));
        // site-1's certificate cannot register site-2's job: refused before dialing
        let err = connect_client_with(&url, "site-2", "j1", timeout, &client)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be site-2"), "{err}");
        job.shutdown().await;
        net.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
