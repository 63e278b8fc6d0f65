//! The site's startup kit, as far as a client job needs it: the project name, how the server is
//! reached, and the client's place in the hierarchy.
//!
//! NVFlare's client job reads `<startup>/fed_client.json` (the `-s` option names the file):
//! `servers[0].name` is the project name its task requests carry, `servers[0].service` says how
//! the server is reached, and the `client` section holds the site's `connection_security`
//! (`clear`, `tls` or `mtls`) and its `fqsn`/`is_leaf`. From these [`StartupConfig::server_route`]
//! decides how fedrun reaches the server job:
//!
//! - **direct**: the kit's scheme is `tcp` or `stcp`: fedrun opens its own connection to the
//!   server, as NVFlare's job process does. It is TLS, as in NVFlare, when the scheme is
//!   `stcp` or the connection is secured: `connection_security` `tls`/`mtls`, or no such
//!   setting and `secure_train` on (NVFlare's default; a provisioned kit says `tcp` and still
//!   means mTLS). TLS uses the kit's credentials ([`StartupConfig::tls_credentials`]:
//!   `rootCA.pem`, `client.crt`, `client.key`) and, in mTLS, requires the server's certificate
//!   to be `servers[0].identity` (default `server`);
//! - **through the parent**: any other scheme (`http`, NVFlare's default, is WebSocket; `grpc`)
//!   or `NVFLARE_BACKBONE_CONN_GEN=1` in the environment. Then fedrun connects to its client
//!   parent only, and the parent relays to and from the server, as NVFlare's own relay
//!   deployments do. All federated traffic then passes through the parent process.
//!
//! The parent connection itself is always clear TCP on localhost; anything else is refused
//! with an error rather than attempted.

use std::path::{Path, PathBuf};

use fedrun_wire::tls::{ConnectionSecurity, KeyPair, TlsCredentials};
use serde_json::Value as Json;

use super::args::WorkerArgs;

/// The environment variable that makes NVFlare's own job process connect to its parent only.
pub const ENV_BACKBONE_CONN_GEN: &str = "NVFLARE_BACKBONE_CONN_GEN";

/// What is wrong with the startup kit or the connection options.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The startup config cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The startup config is not valid JSON (or not an object).
    #[error("{path} is not a valid startup config: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The kit's TLS settings or credentials cannot be used.
    #[error("TLS with the startup kit: {0}")]
    Tls(#[source] fedrun_wire::WireError),
    /// The kit has credentials for secure messages that cannot be used.
    #[error("the startup kit's credentials for secure messages cannot be used: {0}")]
    Credentials(#[source] fedrun_secure::SecureError),
    /// The parent connection asks for something fedrun does not speak.
    #[error("the parent connection {url} (security {security:?}) is not clear TCP: fedrun's wire does not speak it yet")]
    UnsupportedParent {
        /// The `-p` URL.
        url: String,
        /// The `--parent_conn_sec` value.
        security: String,
    },
}

/// How the client job reaches the server job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerRoute {
    /// Its own clear connection to the server at this `tcp://host:port`.
    Direct(String),
    /// Its own TLS connection to the server at this `tcp://host:port`, with the kit's
    /// credentials.
    DirectTls {
        /// The server's address.
        url: String,
        /// `tls` or `mtls`.
        security: ConnectionSecurity,
    },
    /// Through the client parent only; the reason says why.
    ViaParent(String),
}

/// The parts of `fed_client.json` a client job uses.
///
/// # Example
/// ```
/// use fedrun_cli::cj::startup::{ServerRoute, StartupConfig};
///
/// let kit = serde_json::json!({
///     "servers": [{"name": "example_project",
///                  "service": {"target": "localhost:8002", "scheme": "http"}}],
///     "client": {"fqsn": "site-1", "is_leaf": true, "connection_security": "mtls"}
/// });
/// let startup = StartupConfig::from_json(&kit, "fed_client.json".as_ref()).unwrap();
/// assert_eq!(startup.project_name, "example_project");
/// let route = startup.server_route("http", "localhost:8002", true, None).unwrap();
/// assert!(matches!(route, ServerRoute::ViaParent(_)));
/// let route = startup.server_route("tcp", "localhost:8002", true, None).unwrap();
/// assert!(matches!(route, ServerRoute::DirectTls { .. }));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct StartupConfig {
    /// `servers[0].name`: the project name (NVFlare's default `"example_project"` in POC kits).
    pub project_name: String,
    /// `client.connection_security`, lower case, if set.
    pub connection_security: Option<String>,
    /// `servers[0].identity`: the CN of the server's certificate (NVFlare's fallback: `server`).
    pub server_identity: Option<String>,
    /// The `client` section (its `fqsn`, `is_leaf`, ...), as NVFlare's client args.
    pub client: serde_json::Map<String, Json>,
}

impl StartupConfig {
    /// Reads `<startup>/<fed_client>` of the parsed command line.
    ///
    /// # Errors
    ///
    /// [`StartupError::Read`] or [`StartupError::Invalid`].
    pub fn load(args: &WorkerArgs) -> Result<StartupConfig, StartupError> {
        let path = args.startup.join(&args.fed_client);
        let text = std::fs::read_to_string(&path).map_err(|source| StartupError::Read {
            path: path.clone(),
            source,
        })?;
        let json: Json = serde_json::from_str(&text).map_err(|e| StartupError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        StartupConfig::from_json(&json, &path)
    }

    /// The startup config in `json` (read from `path`, named in errors).
    ///
    /// # Errors
    ///
    /// [`StartupError::Invalid`] when `json` is not an object or its parts have wrong types.
    pub fn from_json(json: &Json, path: &Path) -> Result<StartupConfig, StartupError> {
        let invalid = |reason: &str| StartupError::Invalid {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let root = json
            .as_object()
            .ok_or_else(|| invalid("not a JSON object"))?;
        let first_server = match root.get("servers") {
            None => None,
            Some(Json::Array(servers)) => servers.first(),
            Some(_) => return Err(invalid("'servers' is not a list")),
        };
        let server_str = |key: &str| {
            first_server
                .and_then(|s| s.get(key))
                .and_then(Json::as_str)
                .map(str::to_owned)
        };
        let project_name = server_str("name");
        let server_identity = server_str("identity");
        let client = match root.get("client") {
            None => serde_json::Map::new(),
            Some(Json::Object(c)) => c.clone(),
            Some(_) => return Err(invalid("'client' is not an object")),
        };
        let connection_security = match client.get("connection_security") {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.to_ascii_lowercase()),
            Some(_) => return Err(invalid("'client.connection_security' is not a string")),
        };
        Ok(StartupConfig {
            project_name: project_name.unwrap_or_else(|| "example_project".to_owned()),
            connection_security,
            server_identity,
            client,
        })
    }

    /// A `client` entry naming a file of the kit (`ssl_root_cert`, ...), relative to `dir`.
    fn kit_file(&self, dir: &Path, key: &str, default: &str) -> PathBuf {
        dir.join(
            self.client
                .get(key)
                .and_then(Json::as_str)
                .unwrap_or(default),
        )
    }

    /// The site's TLS credentials, as NVFlare's job process loads them from the startup kit
    /// `dir`: `client.ssl_root_cert` (`rootCA.pem`), `client.ssl_cert` / `ssl_private_key`
    /// (`client.crt` / `client.key`, when both exist), and `customRootCA.pem` next to the
    /// root CA.
    ///
    /// # Errors
    ///
    /// [`StartupError::Tls`] when a file does not load.
    pub fn tls_credentials(&self, dir: &Path) -> Result<TlsCredentials, StartupError> {
        let root = self.kit_file(dir, "ssl_root_cert", "rootCA.pem");
        let cert = self.kit_file(dir, "ssl_cert", "client.crt");
        let key = self.kit_file(dir, "ssl_private_key", "client.key");
        let mut creds = TlsCredentials::from_files(&root, None, None).map_err(StartupError::Tls)?;
        if cert.is_file() && key.is_file() {
            creds.client = Some(KeyPair::from_pem_files(&cert, &key).map_err(StartupError::Tls)?);
        }
        let custom = root.with_file_name("customRootCA.pem");
        if custom.is_file() {
            let custom =
                TlsCredentials::from_files(&custom, None, None).map_err(StartupError::Tls)?;
            creds.custom_root_ca = Some(custom.root_ca);
        }
        Ok(creds)
    }

    /// How to reach the server job, from the `-scheme`/`-g` options, `secure_train` (the
    /// `--set` value; NVFlare's default is on) and `NVFLARE_BACKBONE_CONN_GEN` (`conn_gen`).
    ///
    /// # Errors
    ///
    /// [`StartupError::Tls`] for a `connection_security` that is not clear, tls or mtls, or
    /// `stcp` with `clear`.
    pub fn server_route(
        &self,
        scheme: &str,
        target: &str,
        secure_train: bool,
        conn_gen: Option<&str>,
    ) -> Result<ServerRoute, StartupError> {
        if conn_gen.map(str::trim) == Some("1") {
            return Ok(ServerRoute::ViaParent(format!(
                "{ENV_BACKBONE_CONN_GEN}=1: connect to the parent only"
            )));
        }
        let secure_scheme = scheme.eq_ignore_ascii_case("stcp");
        if !secure_scheme && !scheme.eq_ignore_ascii_case("tcp") {
            return Ok(ServerRoute::ViaParent(format!(
                "the kit's scheme is {scheme:?}, which fedrun's wire does not speak yet"
            )));
        }
        let security = ConnectionSecurity::parse(self.connection_security.as_deref())
            .map_err(StartupError::Tls)?;
        // NVFlare: the cell is secure when `connection_security` says tls/mtls, or when it is
        // not set and `secure_train` is on; a secure scheme is TLS whatever they say.
        let secure = match self.connection_security {
            Some(_) => security != ConnectionSecurity::Clear,
            None => secure_train,
        };
        let url = format!("tcp://{target}");
        match (secure_scheme || secure, security) {
            (false, _) => Ok(ServerRoute::Direct(url)),
            (true, ConnectionSecurity::Clear) => {
                Err(StartupError::Tls(fedrun_wire::WireError::TlsConfig(
                    "the scheme stcp means TLS but connection_security is clear".to_owned(),
                )))
            }
            (true, security) => Ok(ServerRoute::DirectTls { url, security }),
        }
    }
}

/// Checks the parent URL (`-p`) and its security (`--parent_conn_sec`): it must be clear TCP.
///
/// # Errors
///
/// [`StartupError::UnsupportedParent`] for any other scheme or security.
pub fn check_parent(url: &str, security: &str) -> Result<(), StartupError> {
    let clear = matches!(security.to_ascii_lowercase().as_str(), "" | "clear");
    if clear && url.starts_with("tcp://") {
        Ok(())
    } else {
        Err(StartupError::UnsupportedParent {
            url: url.to_owned(),
            security: security.to_owned(),
        })
    }
}

/// The site's credentials for NVFlare's secure messages (`cn__secure`), when its startup kit
/// has them: `rootCA.pem` and the site's certificate and key (`client.crt`/`client.key`, or
/// the paths `fed_client.json` names; `server.crt`/`server.key` when present, as NVFlare
/// prefers), with the server's identity (`servers[0].identity`) for the certificate binding.
/// A kit without them gives `None`: secure sends then fail loudly, never in clear.
///
/// # Errors
///
/// [`StartupError::Credentials`] when the kit has the files but they cannot be used (a bad
/// key, a certificate that does not match it, a key that is not 2048-bit RSA).
pub fn secure_credentials(
    startup: &Path,
    fed_client: &str,
) -> Result<Option<std::sync::Arc<fedrun_secure::CellCredentials>>, StartupError> {
    let has = |f: &str| startup.join(f).exists();
    let pair = (has("client.crt") && has("client.key")) || (has("server.crt") && has("server.key"));
    if !(has("rootCA.pem") && pair) {
        return Ok(None);
    }
    fedrun_secure::CellCredentials::from_startup_kit_with(startup, fed_client)
        .map(|c| Some(std::sync::Arc::new(c)))
        .map_err(StartupError::Credentials)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn kit(security: Option<&str>) -> StartupConfig {
        let mut client = json!({"fqsn": "site-1", "is_leaf": true});
        if let Some(s) = security {
            client["connection_security"] = json!(s);
        }
        let j = json!({"servers": [{"name": "p1", "service": {"target": "h:1", "scheme": "tcp"}}],
                       "client": client});
        StartupConfig::from_json(&j, Path::new("f.json")).unwrap()
    }

    #[test]
    fn a_clear_tcp_kit_connects_directly_to_the_server() {
        let route = kit(Some("clear")).server_route("tcp", "127.0.0.1:8002", true, None);
        assert_eq!(
            route.unwrap(),
            ServerRoute::Direct("tcp://127.0.0.1:8002".into())
        );
        let route = kit(None).server_route("tcp", "127.0.0.1:8002", false, None);
        assert_eq!(
            route.unwrap(),
            ServerRoute::Direct("tcp://127.0.0.1:8002".into())
        );
        assert_eq!(kit(None).project_name, "p1");
    }

    #[test]
    fn secured_tcp_and_stcp_kits_connect_directly_over_tls_as_nvflare_decides() {
        use ConnectionSecurity::{Mtls, Tls};
        for (security, scheme, secure_train, want) in [
            (Some("mtls"), "tcp", true, Mtls),
            // an explicit setting wins over secure_train
            (Some("tls"), "tcp", false, Tls),
            // no setting: secure_train on means the default, mtls
            (None, "tcp", true, Mtls),
            // stcp is TLS whatever secure_train says
            (None, "stcp", false, Mtls),
        ] {
            let route = kit(security).server_route(scheme, "h:1", secure_train, None);
            assert_eq!(
                route.unwrap(),
                ServerRoute::DirectTls {
                    url: "tcp://h:1".into(),
                    security: want
                },
                "{security:?} {scheme} {secure_train}"
            );
        }
        assert!(kit(Some("clear"))
            .server_route("stcp", "h:1", true, None)
            .is_err());
        assert!(kit(Some("ssl"))
            .server_route("tcp", "h:1", true, None)
            .is_err());
    }

    #[test]
    fn other_schemes_and_conn_gen_1_go_through_the_parent() {
        for (security, scheme, secure_train, gen) in [
            (Some("clear"), "http", true, None),
            (Some("clear"), "grpc", false, None),
            (Some("mtls"), "grpc", true, None),
            (Some("clear"), "tcp", true, Some("1")),
            (Some("mtls"), "tcp", true, Some("1")),
        ] {
            let route = kit(security)
                .server_route(scheme, "h:1", secure_train, gen)
                .unwrap();
            assert!(
                matches!(route, ServerRoute::ViaParent(_)),
                "{security:?} {scheme} {secure_train} {gen:?}: {route:?}"
            );
        }
    }

    #[test]
    fn bad_startup_configs_and_non_clear_parents_are_errors() {
        assert!(StartupConfig::from_json(&json!([1]), Path::new("f")).is_err());
        assert!(StartupConfig::from_json(&json!({"servers": 1}), Path::new("f")).is_err());
        assert!(StartupConfig::from_json(
            &json!({"client": {"connection_security": 3}}),
            Path::new("f")
        )
        .is_err());
        assert!(check_parent("tcp://localhost:1", "clear").is_ok());
        assert!(check_parent("tcp://localhost:1", "").is_ok());
        assert!(check_parent("tcp://localhost:1", "mtls").is_err());
        assert!(check_parent("grpc://localhost:1", "clear").is_err());
    }

    #[test]
    fn tls_credentials_come_from_the_files_fed_client_json_names() {
        let dir = std::env::temp_dir().join(format!("fedrun-startup-tls-{}", std::process::id()));
        let (_, site) = crate::tls_opts::tests::kits(&dir);
        let startup = kit(Some("mtls"));
        let creds = startup.tls_credentials(&site).unwrap();
        let pair = creds.client.expect("client.crt and client.key");
        assert_eq!(pair.common_name().as_deref(), Some("site-1"));
        assert_eq!(creds.root_ca.len(), 1);
        assert!(creds.custom_root_ca.is_none());
        // a kit naming its own files: a missing certificate means no client pair (TLS mode)
        let mut named = startup.clone();
        named
            .client
            .insert("ssl_cert".into(), json!("elsewhere.crt"));
        assert!(named.tls_credentials(&site).unwrap().client.is_none());
        named
            .client
            .insert("ssl_root_cert".into(), json!("missing.pem"));
        assert!(matches!(
            named.tls_credentials(&site),
            Err(StartupError::Tls(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_kit_with_site_credentials_loads_them_for_secure_messages_and_one_without_gives_none() {
        let kits = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fedrun-secure/tests/data/kit");
        let creds = secure_credentials(&kits.join("site-1"), "fed_client.json")
            .unwrap()
            .unwrap();
        assert_eq!(creds.identity(), "site-1");
        assert_eq!(creds.resolver().resolve("server.J1"), "server1");
        assert!(secure_credentials(&kits, "fed_client.json")
            .unwrap()
            .is_none());
        // present but unusable: site-1's certificate with site-2's key
        let dir = std::env::temp_dir().join(format!("fedrun-kit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (from, to) in [
            ("site-1/rootCA.pem", "rootCA.pem"),
            ("site-1/client.crt", "client.crt"),
            ("site-2/client.key", "client.key"),
        ] {
            std::fs::copy(kits.join(from), dir.join(to)).unwrap();
        }
        let r = secure_credentials(&dir, "fed_client.json");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(r, Err(StartupError::Credentials(_))), "{r:?}");
    }
}
