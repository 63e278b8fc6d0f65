//! The site's startup kit, as far as a client job needs it: the project name, how the server is
//! reached, and the client's place in the hierarchy.
//!
//! NVFlare's client job reads `<startup>/fed_client.json` (the `-s` option names the file):
//! `servers[0].name` is the project name its task requests carry, `servers[0].service` says how
//! the server is reached, and the `client` section holds the site's `connection_security`
//! (`clear`, `tls` or `mtls`) and its `fqsn`/`is_leaf`. From these [`StartupConfig::server_route`]
//! decides how fedrun reaches the server job:
//!
//! - **direct**: the kit's scheme is `tcp` and its connections are `clear` (or the kit does not
//!   secure them and `secure_train` is off): fedrun opens its own connection to the server, as
//!   NVFlare's job process does;
//! - **through the parent**: any other scheme (`http`, NVFlare's default, is WebSocket; `grpc`)
//!   or a TLS/mTLS kit, which fedrun's wire does not speak yet, or `NVFLARE_BACKBONE_CONN_GEN=1`
//!   in the environment. Then fedrun connects to its client parent only, and the parent relays
//!   to and from the server, as NVFlare's own relay deployments do. All federated traffic
//!   then passes through the parent process.
//!
//! The parent connection itself is always clear TCP on localhost; anything else is refused
//! with an error rather than attempted.

use std::path::{Path, PathBuf};

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
    /// Its own connection to the server at this `tcp://host:port`.
    Direct(String),
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
/// let route = startup.server_route("http", "localhost:8002", true, None);
/// assert!(matches!(route, ServerRoute::ViaParent(_)));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct StartupConfig {
    /// `servers[0].name`: the project name (NVFlare's default `"example_project"` in POC kits).
    pub project_name: String,
    /// `client.connection_security`, lower case, if set.
    pub connection_security: Option<String>,
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
        let project_name = match root.get("servers") {
            None => None,
            Some(Json::Array(servers)) => servers
                .first()
                .and_then(|s| s.get("name"))
                .and_then(Json::as_str)
                .map(str::to_owned),
            Some(_) => return Err(invalid("'servers' is not a list")),
        };
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
            client,
        })
    }

    /// How to reach the server job, from the `-scheme`/`-g` options, `secure_train` (the
    /// `--set` value; NVFlare's default is on) and `NVFLARE_BACKBONE_CONN_GEN` (`conn_gen`).
    pub fn server_route(
        &self,
        scheme: &str,
        target: &str,
        secure_train: bool,
        conn_gen: Option<&str>,
    ) -> ServerRoute {
        if conn_gen.map(str::trim) == Some("1") {
            return ServerRoute::ViaParent(format!(
                "{ENV_BACKBONE_CONN_GEN}=1: connect to the parent only"
            ));
        }
        if !scheme.eq_ignore_ascii_case("tcp") {
            return ServerRoute::ViaParent(format!(
                "the kit's scheme is {scheme:?}, which fedrun's wire does not speak yet"
            ));
        }
        // NVFlare secures a connection unless it is explicitly clear; without the setting,
        // `secure_train` decides.
        let clear = match self.connection_security.as_deref() {
            Some("clear") => true,
            Some(_) => false,
            None => !secure_train,
        };
        if !clear {
            return ServerRoute::ViaParent(format!(
                "the kit's connections are {} (TLS), which fedrun's wire does not speak yet",
                self.connection_security.as_deref().unwrap_or("secure")
            ));
        }
        ServerRoute::Direct(format!("tcp://{target}"))
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
        assert_eq!(route, ServerRoute::Direct("tcp://127.0.0.1:8002".into()));
        let route = kit(None).server_route("tcp", "127.0.0.1:8002", false, None);
        assert_eq!(route, ServerRoute::Direct("tcp://127.0.0.1:8002".into()));
        assert_eq!(kit(None).project_name, "p1");
    }

    #[test]
    fn other_schemes_tls_kits_and_conn_gen_1_go_through_the_parent() {
        for (security, scheme, secure_train, gen) in [
            (Some("clear"), "http", true, None),
            (Some("clear"), "grpc", false, None),
            (Some("mtls"), "tcp", true, None),
            (Some("tls"), "tcp", false, None),
            (None, "tcp", true, None),
            (Some("clear"), "tcp", true, Some("1")),
        ] {
            let route = kit(security).server_route(scheme, "h:1", secure_train, gen);
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
