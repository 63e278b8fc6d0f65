//! The command line and environment NVFlare's client parent gives its job process.
//!
//! NVFlare's client parent (CP) starts each job's worker with a fixed set of options
//! (`-m WORKSPACE -w STARTUP -n JOB_ID -c CLIENT -p PARENT_URL --parent_conn_sec SEC
//! -g TARGET -scheme SCHEME -s FED_CLIENT --set k=v ...`) and, since NVFlare 2.9, the job's
//! credentials in three environment variables. `fedrun job` must accept exactly what the stock
//! worker accepts, so it cannot use clap: the stock worker is a Python `argparse` program with
//! single-dash long options (`-scheme`, `-ts`) that clap does not support. [`WorkerArgs::parse`]
//! takes every option in its short and long form, `--opt value` and `--opt=value`, and `--set`
//! with any number of `KEY=VALUE` items (up to the next option), as argparse does. An unknown
//! option, a missing value or a missing required option is an [`ArgsError`], never a panic.
//!
//! The credentials ([`CREDENTIAL_VARS`]) are taken out of the process environment by
//! [`take_credentials`] before anything else starts, as the stock worker does, so that nothing
//! the job starts inherits them; a value given on the command line (`-t`, `-ts`, `-d`) wins.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// The environment variable with the site's auth token.
pub const ENV_AUTH_TOKEN: &str = "NVFLARE_JOB_AUTH_TOKEN";
/// The environment variable with the token's signature (opaque to the job).
pub const ENV_TOKEN_SIGNATURE: &str = "NVFLARE_JOB_TOKEN_SIGNATURE";
/// The environment variable with the session id.
pub const ENV_SSID: &str = "NVFLARE_JOB_SSID";
/// The three credential variables, in that order.
pub const CREDENTIAL_VARS: [&str; 3] = [ENV_AUTH_TOKEN, ENV_TOKEN_SIGNATURE, ENV_SSID];

/// What is wrong with a command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// An option the stock worker does not have.
    #[error("unknown option {0:?}")]
    Unknown(String),
    /// An option given without its value.
    #[error("option {0} needs a value")]
    MissingValue(&'static str),
    /// A required option (or credential) is absent.
    #[error("missing {0}")]
    Missing(&'static str),
    /// A `--set` item that is not `KEY=VALUE`.
    #[error("--set item {0:?} is not KEY=VALUE")]
    BadSet(String),
    /// A value that does not parse.
    #[error("option {option}: {reason}")]
    BadValue {
        /// The option.
        option: &'static str,
        /// Why.
        reason: String,
    },
}

/// The credentials of one job process, from the environment or the command line.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// The site's auth token (`NVFLARE_JOB_AUTH_TOKEN`, `-t`).
    pub token: Option<String>,
    /// The token's signature (`NVFLARE_JOB_TOKEN_SIGNATURE`, `-ts`).
    pub token_signature: Option<String>,
    /// The session id (`NVFLARE_JOB_SSID`, `-d`).
    pub ssid: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never print a secret
        let shown = |v: &Option<String>| if v.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("Credentials")
            .field("token", &shown(&self.token))
            .field("token_signature", &shown(&self.token_signature))
            .field("ssid", &self.ssid)
            .finish()
    }
}

/// Removes the credential variables from this process's environment and returns their values.
///
/// Call it first thing in `main`, before any thread starts (changing the environment is only
/// sound while no other thread reads it).
pub fn take_credentials() -> Credentials {
    let take = |name: &str| {
        let value = std::env::var(name).ok();
        std::env::remove_var(name);
        value
    };
    Credentials {
        token: take(ENV_AUTH_TOKEN),
        token_signature: take(ENV_TOKEN_SIGNATURE),
        ssid: take(ENV_SSID),
    }
}

/// The parsed command line of `fedrun job` (the stock worker's options).
///
/// # Example
/// ```
/// use fedrun_cli::cj::args::{Credentials, WorkerArgs};
///
/// let argv = "-m /ws/site-1 -w /ws/site-1/startup -n job-1 -c site-1 -p tcp://localhost:7691 \
///             --parent_conn_sec clear -g 127.0.0.1:8002 -scheme tcp -s fed_client.json \
///             --set secure_train=true uid=site-1 config_folder=config";
/// let env = Credentials { token: Some("tok".into()), token_signature: Some("sig".into()),
///                         ssid: Some("NA".into()) };
/// let args = WorkerArgs::parse(argv.split_whitespace().map(String::from), env).unwrap();
/// assert_eq!(args.client_name, "site-1");
/// assert_eq!(args.sp_scheme, "tcp");
/// assert_eq!(args.set.get("config_folder").map(String::as_str), Some("config"));
/// assert_eq!(args.token, "tok");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct WorkerArgs {
    /// `-m`/`--workspace`: the site's workspace root (the job lives in `<ws>/<job_id>`).
    pub workspace: PathBuf,
    /// `-w`/`--startup`: the site's startup kit folder.
    pub startup: PathBuf,
    /// `-n`/`--job_id`.
    pub job_id: String,
    /// `-c`/`--client_name`: the site name.
    pub client_name: String,
    /// `-p`/`--parent_url`: the client parent's internal listener (`tcp://localhost:PORT`).
    pub parent_url: String,
    /// `--parent_conn_sec`: the security of the parent connection (`clear` or empty).
    pub parent_conn_sec: String,
    /// `-g`/`--sp_target`: the server's `host:port`.
    pub sp_target: String,
    /// `-scheme`/`--sp_scheme`: the server's scheme (`tcp`, `http`, `grpc`, ...).
    pub sp_scheme: String,
    /// `-s`/`--fed_client`: the startup config file name (in the startup folder).
    pub fed_client: String,
    /// `--set` items, in order (a later key wins).
    pub set: BTreeMap<String, String>,
    /// `--local_rank` (accepted, unused).
    pub local_rank: i64,
    /// The auth token.
    pub token: String,
    /// The token's signature.
    pub token_signature: String,
    /// The session id.
    pub ssid: String,
}

impl std::fmt::Debug for WorkerArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerArgs")
            .field("workspace", &self.workspace)
            .field("startup", &self.startup)
            .field("job_id", &self.job_id)
            .field("client_name", &self.client_name)
            .field("parent_url", &self.parent_url)
            .field("parent_conn_sec", &self.parent_conn_sec)
            .field("sp_target", &self.sp_target)
            .field("sp_scheme", &self.sp_scheme)
            .field("fed_client", &self.fed_client)
            .field("set", &self.set)
            .field("ssid", &self.ssid)
            .finish_non_exhaustive()
    }
}

/// Every option: (names, field key). `set` is handled apart.
const OPTIONS: &[(&[&str], &str)] = &[
    (&["-m", "--workspace"], "workspace"),
    (&["-w", "--startup"], "startup"),
    (&["-t", "--token"], "token"),
    (&["-ts", "--token_signature"], "token_signature"),
    (&["-d", "--ssid"], "ssid"),
    (&["-n", "--job_id"], "job_id"),
    (&["-c", "--client_name"], "client_name"),
    (&["-g", "--sp_target"], "sp_target"),
    (&["-scheme", "--sp_scheme"], "sp_scheme"),
    (&["-p", "--parent_url"], "parent_url"),
    (&["--parent_conn_sec"], "parent_conn_sec"),
    (&["-s", "--fed_client"], "fed_client"),
    (&["--local_rank"], "local_rank"),
];

fn option_key(name: &str) -> Option<&'static str> {
    OPTIONS
        .iter()
        .find(|(names, _)| names.contains(&name))
        .map(|(_, key)| *key)
}

/// Does `arg` look like an option (argparse: starts with `-` and is not a negative number)?
fn looks_like_option(arg: &str) -> bool {
    arg.starts_with('-') && arg.len() > 1 && arg.parse::<f64>().is_err()
}

impl WorkerArgs {
    /// Parses the arguments after `fedrun job`; `env` holds the credentials taken from the
    /// environment ([`take_credentials`]), which a command-line value overrides.
    ///
    /// # Errors
    ///
    /// An [`ArgsError`] naming the first problem found.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env: Credentials,
    ) -> Result<WorkerArgs, ArgsError> {
        let mut values: BTreeMap<&'static str, String> = BTreeMap::new();
        let mut set = BTreeMap::new();
        let mut args = args.into_iter().peekable();
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            if name == "--set" {
                let mut items: Vec<String> = inline.into_iter().collect();
                while let Some(next) = args.peek() {
                    if looks_like_option(next) {
                        break;
                    }
                    items.extend(args.next());
                }
                for item in items {
                    let Some((k, v)) = item.split_once('=') else {
                        return Err(ArgsError::BadSet(item));
                    };
                    set.insert(k.trim().to_owned(), v.trim().to_owned());
                }
                continue;
            }
            let Some(key) = option_key(&name) else {
                return Err(ArgsError::Unknown(arg));
            };
            let value = match inline {
                Some(v) => v,
                None => match args.next() {
                    Some(v) if !looks_like_option(&v) => v,
                    _ => return Err(ArgsError::MissingValue(key)),
                },
            };
            values.insert(key, value);
        }
        let mut take = |key: &'static str| values.remove(key);
        let required = |v: Option<String>, key: &'static str| v.ok_or(ArgsError::Missing(key));
        let token = take("token").or(env.token);
        let token_signature = take("token_signature").or(env.token_signature);
        let ssid = take("ssid").or(env.ssid);
        let local_rank = match take("local_rank") {
            None => 0,
            Some(v) => v.parse().map_err(|e| ArgsError::BadValue {
                option: "--local_rank",
                reason: format!("{v:?}: {e}"),
            })?,
        };
        Ok(WorkerArgs {
            workspace: required(take("workspace"), "-m/--workspace")?.into(),
            startup: required(take("startup"), "-w/--startup")?.into(),
            job_id: required(take("job_id"), "-n/--job_id")?,
            client_name: required(take("client_name"), "-c/--client_name")?,
            parent_url: required(take("parent_url"), "-p/--parent_url")?,
            parent_conn_sec: take("parent_conn_sec").unwrap_or_default(),
            sp_target: required(take("sp_target"), "-g/--sp_target")?,
            sp_scheme: required(take("sp_scheme"), "-scheme/--sp_scheme")?,
            fed_client: required(take("fed_client"), "-s/--fed_client")?,
            set,
            local_rank,
            token: token.ok_or(ArgsError::Missing(
                "the auth token (NVFLARE_JOB_AUTH_TOKEN or -t/--token)",
            ))?,
            token_signature: token_signature.ok_or(ArgsError::Missing(
                "the token signature (NVFLARE_JOB_TOKEN_SIGNATURE or -ts/--token_signature)",
            ))?,
            ssid: ssid.ok_or(ArgsError::Missing(
                "the session id (NVFLARE_JOB_SSID or -d/--ssid)",
            ))?,
        })
    }

    /// The `--set` value of `key` read as NVFlare reads booleans (`true`/`false`, any case).
    pub fn set_flag(&self, key: &str) -> Option<bool> {
        self.set.get(key).map(|v| v.eq_ignore_ascii_case("true"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            token: Some("env-tok".into()),
            token_signature: Some("env-sig".into()),
            ssid: Some("NA".into()),
        }
    }

    fn parse(line: &str, env: Credentials) -> Result<WorkerArgs, ArgsError> {
        WorkerArgs::parse(line.split_whitespace().map(String::from), env)
    }

    const STOCK: &str = "-m /k/site-1 -w /k/site-1/startup -n J -c site-1 \
        -p tcp://localhost:7691 --parent_conn_sec clear -g 127.0.0.1:38945 -scheme tcp \
        -s fed_client.json --set secure_train=true uid=site-1 org=nvidia config_folder=config \
        print_conf=True";

    #[test]
    fn the_stock_command_line_parses_with_credentials_from_the_environment() {
        let a = parse(STOCK, creds()).unwrap();
        assert_eq!(a.workspace, PathBuf::from("/k/site-1"));
        assert_eq!(a.startup, PathBuf::from("/k/site-1/startup"));
        assert_eq!(a.job_id, "J");
        assert_eq!(a.parent_url, "tcp://localhost:7691");
        assert_eq!(a.parent_conn_sec, "clear");
        assert_eq!(a.sp_target, "127.0.0.1:38945");
        assert_eq!(a.fed_client, "fed_client.json");
        assert_eq!(a.set.len(), 5);
        assert_eq!(a.set_flag("secure_train"), Some(true));
        assert_eq!(a.set_flag("print_conf"), Some(true));
        assert_eq!(
            (
                a.token.as_str(),
                a.token_signature.as_str(),
                a.ssid.as_str()
            ),
            ("env-tok", "env-sig", "NA")
        );
    }

    #[test]
    fn long_forms_and_equals_values_parse_and_the_command_line_beats_the_environment() {
        let line = "--workspace=/w --startup /w/s --job_id J --client_name site-2 \
            --parent_url tcp://localhost:1 --sp_target h:2 --sp_scheme http --fed_client f.json \
            -t cli-tok -ts cli-sig -d S1 --local_rank 3";
        let a = parse(line, creds()).unwrap();
        assert_eq!(a.workspace, PathBuf::from("/w"));
        assert_eq!(a.sp_scheme, "http");
        assert_eq!(a.parent_conn_sec, "");
        assert_eq!(a.local_rank, 3);
        assert_eq!(
            (
                a.token.as_str(),
                a.token_signature.as_str(),
                a.ssid.as_str()
            ),
            ("cli-tok", "cli-sig", "S1")
        );
    }

    #[test]
    fn unknown_options_missing_values_and_missing_options_are_errors() {
        assert_eq!(
            parse(&format!("{STOCK} --bogus 1"), creds()).unwrap_err(),
            ArgsError::Unknown("--bogus".into())
        );
        assert_eq!(
            parse("-m /w -n", creds()).unwrap_err(),
            ArgsError::MissingValue("job_id")
        );
        assert_eq!(
            parse("-m /w -n -c site-1", creds()).unwrap_err(),
            ArgsError::MissingValue("job_id")
        );
        assert_eq!(
            parse(&STOCK.replace("-g 127.0.0.1:38945", ""), creds()).unwrap_err(),
            ArgsError::Missing("-g/--sp_target")
        );
        assert!(matches!(
            parse(STOCK, Credentials::default()).unwrap_err(),
            ArgsError::Missing(m) if m.contains("NVFLARE_JOB_AUTH_TOKEN")
        ));
        assert_eq!(
            parse(&format!("{STOCK} --set novalue"), creds()).unwrap_err(),
            ArgsError::BadSet("novalue".into())
        );
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let a = parse(STOCK, creds()).unwrap();
        let shown = format!("{a:?} {:?}", creds());
        assert!(
            !shown.contains("env-tok") && !shown.contains("env-sig"),
            "{shown}"
        );
    }
}
