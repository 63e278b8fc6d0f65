//! Aux-message targets: how a caller names them, and how names become cells.
//!
//! NVFlare resolves target names with one rule in `send_aux_request` (reserved words
//! case-insensitive) and another in `validate_targets` (only the exact `"server"`), keys the server
//! parent's reply `"server"` like the server's, and fails with a type error on `@ALL` before the
//! job clients are known. fedrun has one rule, used everywhere:
//!
//! - `"server"` and `"server_parent"` are reserved words, matched **case-insensitively**; they win
//!   over a client with the same name;
//! - any other name is a job client's name, matched **exactly**;
//! - `"@ALL"` (exact) is a whole-argument form ([`AuxTargets::All`]), never a single name: inside a
//!   list it is an unknown name;
//! - reply keys are `"server"`, `"server_parent"` and the clients' names.

use std::collections::HashMap;

use fedrun_cell::Fqcn;
use fedrun_core::constants::{process_type, site_type};
use fedrun_core::{AuxMsgTarget, Client};

use crate::error::EngineError;

/// Where an outgoing aux request goes.
///
/// Parsing a string ([`From<&str>`](#impl-From%3C%26str%3E-for-AuxTargets)) follows the rule of
/// the module doc: `""` → [`Server`](AuxTargets::Server), `"server"`/`"server_parent"` in any case
/// → the server / its parent, exact `"@ALL"` → [`All`](AuxTargets::All), anything else → one site.
///
/// # Example
/// ```
/// use fedrun_engine::AuxTargets;
///
/// assert_eq!(AuxTargets::from(""), AuxTargets::Server);
/// assert_eq!(AuxTargets::from("SERVER"), AuxTargets::Server);
/// assert_eq!(AuxTargets::from("Server_Parent"), AuxTargets::ServerParent);
/// assert_eq!(AuxTargets::from("@ALL"), AuxTargets::All);
/// assert_eq!(AuxTargets::from("@all"), AuxTargets::Site("@all".into()));
/// assert_eq!(AuxTargets::from(vec!["site-1", "site-2"]),
///            AuxTargets::Sites(vec!["site-1".into(), "site-2".into()]));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum AuxTargets {
    /// The server's job process (`server.<job>`), reply key `"server"`. Also what "no targets"
    /// means.
    #[default]
    Server,
    /// The server's parent process (`server`, not job-scoped), reply key `"server_parent"`.
    ServerParent,
    /// One target by name (a reserved word or a job client's name).
    Site(String),
    /// Several targets by name, each resolved like [`Site`](AuxTargets::Site); an empty list means
    /// the server.
    Sites(Vec<String>),
    /// `@ALL`: the server, then every job client except this site, in job-meta order.
    All,
}

impl From<&str> for AuxTargets {
    fn from(s: &str) -> Self {
        if s.is_empty() {
            AuxTargets::Server
        } else if s == site_type::ALL {
            AuxTargets::All
        } else {
            match reserved(s) {
                Some(Reserved::Server) => AuxTargets::Server,
                Some(Reserved::ServerParent) => AuxTargets::ServerParent,
                None => AuxTargets::Site(s.to_owned()),
            }
        }
    }
}

impl From<String> for AuxTargets {
    fn from(s: String) -> Self {
        AuxTargets::from(s.as_str())
    }
}

impl From<&String> for AuxTargets {
    fn from(s: &String) -> Self {
        AuxTargets::from(s.as_str())
    }
}

impl From<Vec<String>> for AuxTargets {
    fn from(names: Vec<String>) -> Self {
        AuxTargets::Sites(names)
    }
}

impl From<Vec<&str>> for AuxTargets {
    fn from(names: Vec<&str>) -> Self {
        AuxTargets::Sites(names.into_iter().map(str::to_owned).collect())
    }
}

impl From<&[&str]> for AuxTargets {
    fn from(names: &[&str]) -> Self {
        AuxTargets::Sites(names.iter().map(|s| (*s).to_owned()).collect())
    }
}

impl From<Option<AuxTargets>> for AuxTargets {
    fn from(t: Option<AuxTargets>) -> Self {
        t.unwrap_or_default()
    }
}

/// The reply key of the server's parent (the server's is `"server"`).
pub const SERVER_PARENT_KEY: &str = site_type::SERVER_PARENT;

/// The reserved words among target names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reserved {
    Server,
    ServerParent,
}

fn reserved(name: &str) -> Option<Reserved> {
    if name.eq_ignore_ascii_case(site_type::SERVER) {
        Some(Reserved::Server)
    } else if name.eq_ignore_ascii_case(site_type::SERVER_PARENT) {
        Some(Reserved::ServerParent)
    } else {
        None
    }
}

/// The server's job process target, keyed `"server"`.
pub(crate) fn server_target() -> AuxMsgTarget {
    AuxMsgTarget::server()
}

/// The server parent's target, keyed `"server_parent"`.
pub(crate) fn server_parent_target() -> AuxMsgTarget {
    AuxMsgTarget::new(SERVER_PARENT_KEY, site_type::SERVER, false)
}

/// The job's clients, as loaded from the job meta, with a name index.
#[derive(Clone, Debug, Default)]
pub(crate) struct Directory {
    clients: Vec<Client>,
    by_name: HashMap<String, usize>,
}

impl Directory {
    /// A directory of `clients` (names are unique: the hierarchy check guarantees it).
    pub(crate) fn new(clients: Vec<Client>) -> Self {
        let by_name = clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        Directory { clients, by_name }
    }

    pub(crate) fn clients(&self) -> &[Client] {
        &self.clients
    }

    pub(crate) fn client(&self, name: &str) -> Option<&Client> {
        self.by_name.get(name).and_then(|&i| self.clients.get(i))
    }
}

/// The single-name rule: a reserved word (any case) or a job client's exact name.
pub(crate) fn resolve_name(name: &str, dir: Option<&Directory>) -> Option<AuxMsgTarget> {
    match reserved(name) {
        Some(Reserved::Server) => Some(server_target()),
        Some(Reserved::ServerParent) => Some(server_parent_target()),
        None => dir.and_then(|d| d.client(name)).map(AuxMsgTarget::client),
    }
}

/// Resolves `targets` to message targets, failing before anything is sent.
///
/// # Errors
///
/// [`EngineError::JobClientsNotLoaded`] for `@ALL` before the directory exists;
/// [`EngineError::UnknownTarget`] for the first name that does not resolve.
pub(crate) fn resolve(
    targets: &AuxTargets,
    dir: Option<&Directory>,
    self_name: &str,
) -> Result<Vec<AuxMsgTarget>, EngineError> {
    let one = |name: &str| {
        resolve_name(name, dir).ok_or_else(|| EngineError::UnknownTarget(name.to_owned()))
    };
    match targets {
        AuxTargets::Server => Ok(vec![server_target()]),
        AuxTargets::ServerParent => Ok(vec![server_parent_target()]),
        AuxTargets::Site(name) => Ok(vec![one(name)?]),
        AuxTargets::Sites(names) if names.is_empty() => Ok(vec![server_target()]),
        AuxTargets::Sites(names) => names.iter().map(|n| one(n)).collect(),
        AuxTargets::All => {
            let dir = dir.ok_or(EngineError::JobClientsNotLoaded)?;
            let mut out = Vec::with_capacity(dir.clients().len() + 1);
            out.push(server_target());
            out.extend(
                dir.clients()
                    .iter()
                    .filter(|c| c.name != self_name)
                    .map(AuxMsgTarget::client),
            );
            Ok(out)
        }
    }
}

/// Splits `names` into those the single-name rule resolves and the others, in order, keeping
/// duplicates (NVFlare's `validate_targets`, with the one rule of this module).
pub(crate) fn validate(names: Vec<String>, dir: Option<&Directory>) -> (Vec<String>, Vec<String>) {
    names
        .into_iter()
        .partition(|name| resolve_name(name, dir).is_some())
}

/// The cell a target's message goes to: a job-scoped target in a job process
/// (`CJ`/`SJ`) is `<fqcn>.<job_id>`; otherwise (not job-scoped, or a parent process `CP`/`SP`)
/// the target's FQCN as is.
///
/// # Errors
///
/// [`EngineError::InvalidProcessType`] for a process type other than `CP`, `SP`, `CJ`, `SJ`
/// (checked for every target, as NVFlare does); [`EngineError::InvalidTargetFqcn`] when the
/// resulting name is not a valid FQCN.
pub(crate) fn target_fqcn(
    target: &AuxMsgTarget,
    process: &str,
    job_id: &str,
) -> Result<Fqcn, EngineError> {
    let job_process = match process {
        process_type::CLIENT_JOB | process_type::SERVER_JOB => true,
        process_type::CLIENT_PARENT | process_type::SERVER_PARENT => false,
        other => return Err(EngineError::InvalidProcessType(other.to_owned())),
    };
    let name = if target.job_scoped && job_process {
        format!("{}{}{job_id}", target.fqcn, Fqcn::SEPARATOR)
    } else {
        target.fqcn.clone()
    };
    Fqcn::new(name.as_str()).map_err(|e| EngineError::InvalidTargetFqcn {
        fqcn: name,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dir() -> Directory {
        let mut relay = Client::new("site-2", "");
        relay.fqcn = "relay.site-2".into();
        Directory::new(vec![
            Client::new("site-1", ""),
            relay,
            Client::new("site-3", ""),
        ])
    }

    fn names(targets: &[AuxMsgTarget]) -> Vec<&str> {
        targets.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn reserved_words_are_case_insensitive_and_clients_exact() {
        let d = dir();
        assert_eq!(resolve_name("SeRvEr", Some(&d)).unwrap(), server_target());
        assert_eq!(
            resolve_name("SERVER_PARENT", Some(&d)).unwrap(),
            server_parent_target()
        );
        assert!(resolve_name("site-1", Some(&d)).is_some());
        assert!(resolve_name("SITE-1", Some(&d)).is_none());
        assert!(resolve_name("@ALL", Some(&d)).is_none());
        assert!(resolve_name("", Some(&d)).is_none());
        assert!(resolve_name("site-1", None).is_none());
    }

    #[test]
    fn all_is_server_then_every_other_client_in_meta_order() {
        let d = dir();
        let t = resolve(&AuxTargets::All, Some(&d), "site-2").unwrap();
        assert_eq!(names(&t), ["server", "site-1", "site-3"]);
        assert_eq!(
            resolve(&AuxTargets::All, None, "site-2"),
            Err(EngineError::JobClientsNotLoaded)
        );
    }

    #[test]
    fn first_unknown_name_fails_the_whole_list() {
        let d = dir();
        let t = AuxTargets::from(vec!["site-1", "nope", "also-not"]);
        assert_eq!(
            resolve(&t, Some(&d), "site-1"),
            Err(EngineError::UnknownTarget("nope".into()))
        );
        let t = AuxTargets::from(vec!["site-1", "@ALL"]);
        assert_eq!(
            resolve(&t, Some(&d), "site-1"),
            Err(EngineError::UnknownTarget("@ALL".into()))
        );
        assert_eq!(
            names(&resolve(&AuxTargets::Sites(vec![]), Some(&d), "x").unwrap()),
            ["server"]
        );
    }

    #[test]
    fn validate_uses_the_same_rule_and_keeps_order_and_duplicates() {
        let d = dir();
        let input = [
            "server",
            "SERVER",
            "server_parent",
            "site-2",
            "x",
            "site-1",
            "@ALL",
            "site-2",
        ]
        .map(str::to_owned)
        .to_vec();
        let (valid, invalid) = validate(input, Some(&d));
        assert_eq!(
            valid,
            [
                "server",
                "SERVER",
                "server_parent",
                "site-2",
                "site-1",
                "site-2"
            ]
        );
        assert_eq!(invalid, ["x", "@ALL"]);
    }

    #[test]
    fn target_fqcn_appends_the_job_only_for_job_scoped_targets_in_job_processes() {
        let d = dir();
        let relay = resolve_name("site-2", Some(&d)).unwrap();
        let f = |t: &AuxMsgTarget, p: &str| target_fqcn(t, p, "j1").map(|f| f.to_string());
        assert_eq!(f(&server_target(), "CJ").unwrap(), "server.j1");
        assert_eq!(f(&server_target(), "SJ").unwrap(), "server.j1");
        assert_eq!(f(&server_parent_target(), "CJ").unwrap(), "server");
        assert_eq!(f(&relay, "CJ").unwrap(), "relay.site-2.j1");
        assert_eq!(f(&relay, "CP").unwrap(), "relay.site-2");
        assert_eq!(f(&server_target(), "SP").unwrap(), "server");
        assert_eq!(
            f(&server_target(), "XX"),
            Err(EngineError::InvalidProcessType("XX".into()))
        );
        let bad = AuxMsgTarget::new("bad", "a b", true);
        assert!(matches!(
            target_fqcn(&bad, "CJ", "j1"),
            Err(EngineError::InvalidTargetFqcn { .. })
        ));
    }
}
