//! Clients of a job, the dict form they travel in, and their hierarchy.
//!
//! A job's meta lists the sites that take part (`job_clients`), each as a dict with its name, its
//! cell name (FQCN), its site name in the hierarchy (FQSN, dot-separated from the root) and
//! whether it is a leaf. The engine resolves aux-message targets against these clients, and the
//! hierarchy (a forest keyed by FQSN) tells each site its parent and children.
//!
//! [`parse_job_clients`] builds the clients *and* the hierarchy before returning anything, so a
//! caller can replace its directory in one step and never keeps a half-updated one.

use indexmap::IndexMap;

use crate::error::CoreError;
use crate::value::{Map, Value};

/// The key of the client list in a job's meta.
pub const JOB_CLIENTS: &str = crate::constants::job_meta_key::JOB_CLIENTS;

/// One site of a job (NVFlare's `Client`).
///
/// # Example
/// ```
/// use fedrun_core::{Client, Map, Value};
///
/// let mut d = Map::new();
/// d.insert("name", "site-2");
/// d.insert("fqsn", "site-1.site-2");
/// d.insert("is_leaf", true);
/// let c = Client::from_value(&Value::from(d)).unwrap();
/// assert_eq!(c.fqcn, "site-2"); // defaults to the name
/// assert_eq!(c.fqsn, "site-1.site-2");
/// assert_eq!(Client::from_value(&c.to_value()).unwrap(), c);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Client {
    /// The site name.
    pub name: String,
    /// The authorisation token (`""` when built from a dict).
    pub token: String,
    /// The fully qualified cell name (defaults to the name).
    pub fqcn: String,
    /// The fully qualified site name in the hierarchy (defaults to the name).
    pub fqsn: String,
    /// Whether the site is a leaf of the hierarchy (defaults to true).
    pub is_leaf: bool,
    /// The site's configuration, when known.
    pub site_config: Option<Value>,
}

/// A string field of a client dict: `None` when absent or nil, an error when not a string.
fn str_field(d: &Map, field: &'static str) -> Result<Option<String>, CoreError> {
    match d.get(field) {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Str(s)) => Ok(Some(s.clone())),
        Some(other) => Err(CoreError::ClientDictBadField {
            field,
            expected: "str",
            got: other.kind(),
        }),
    }
}

impl Client {
    /// A client whose FQCN and FQSN are its name, a leaf, without site config.
    pub fn new(name: &str, token: &str) -> Self {
        Client {
            name: name.to_owned(),
            token: token.to_owned(),
            fqcn: name.to_owned(),
            fqsn: name.to_owned(),
            is_leaf: true,
            site_config: None,
        }
    }

    /// Read a client dict (NVFlare's `Client.from_dict`): it must be a map with a non-empty
    /// string `name`; `fqcn` and `fqsn` default to the name and `is_leaf` to true (a nil value
    /// counts as absent); `site_config` is copied when present. The token is `""`.
    pub fn from_value(d: &Value) -> Result<Client, CoreError> {
        let Value::Map(d) = d else {
            return Err(CoreError::ClientDictNotAMap(d.kind()));
        };
        let name = match str_field(d, "name")? {
            Some(n) if !n.is_empty() => n,
            _ => return Err(CoreError::ClientDictMissingName),
        };
        let fqcn = str_field(d, "fqcn")?.unwrap_or_else(|| name.clone());
        let fqsn = str_field(d, "fqsn")?.unwrap_or_else(|| name.clone());
        let is_leaf = match d.get("is_leaf") {
            None | Some(Value::Nil) => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(CoreError::ClientDictBadField {
                    field: "is_leaf",
                    expected: "bool",
                    got: other.kind(),
                })
            }
        };
        let site_config = match d.get("site_config") {
            None | Some(Value::Nil) => None,
            Some(v) => Some(v.clone()),
        };
        Ok(Client {
            name,
            token: String::new(),
            fqcn,
            fqsn,
            is_leaf,
            site_config,
        })
    }

    /// The dict form: `name`, `fqcn`, `fqsn`, `is_leaf`, and `site_config` when present.
    pub fn to_value(&self) -> Value {
        let mut d = Map::with_capacity(5);
        d.insert("name", self.name.as_str());
        d.insert("fqcn", self.fqcn.as_str());
        d.insert("fqsn", self.fqsn.as_str());
        d.insert("is_leaf", self.is_leaf);
        if let Some(cfg) = &self.site_config {
            d.insert("site_config", cfg.clone());
        }
        Value::Map(d)
    }
}

/// A node of the client hierarchy: the names of its parent and children.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct HierarchyNode {
    /// The client's FQSN.
    pub fqsn: String,
    /// The parent client's name (`None` for a root).
    pub parent: Option<String>,
    /// The children's names, in input order.
    pub children: Vec<String>,
}

/// The job clients' hierarchy: a forest built from the clients' FQSNs (NVFlare's `Forest`).
///
/// # Example
/// ```
/// use fedrun_core::{build_client_hierarchy, Client};
///
/// let mut leaf = Client::new("site-2", "");
/// leaf.fqsn = "site-1.site-2".into();
/// let forest = build_client_hierarchy(&[leaf, Client::new("site-1", "")]).unwrap();
/// assert_eq!(forest.roots(), ["site-1"]);
/// assert_eq!(forest.parent("site-2"), Some("site-1"));
/// assert_eq!(forest.children("site-1"), ["site-2"]);
/// ```
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ClientHierarchy {
    roots: Vec<String>,
    nodes: IndexMap<String, HierarchyNode>,
}

impl ClientHierarchy {
    /// The root clients' names, in input order.
    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// A client's node.
    pub fn node(&self, name: &str) -> Option<&HierarchyNode> {
        self.nodes.get(name)
    }

    /// A client's parent's name (`None` for a root or an unknown name).
    pub fn parent(&self, name: &str) -> Option<&str> {
        self.nodes.get(name).and_then(|n| n.parent.as_deref())
    }

    /// A client's children's names (empty for a leaf or an unknown name).
    pub fn children(&self, name: &str) -> &[String] {
        self.nodes.get(name).map_or(&[], |n| n.children.as_slice())
    }

    /// Every node, by client name, in input order.
    pub fn nodes(&self) -> impl Iterator<Item = (&str, &HierarchyNode)> {
        self.nodes.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when there are no clients.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The structure as a value, in the shape of NVFlare's `forest_to_dict`: `{"roots": [names],
    /// "trees": [tree]}`, where a tree is a leaf's name or `{name: [child trees]}`. This is what
    /// the engine stores as the `__client_hierarchy__` prop.
    pub fn to_value(&self) -> Value {
        let mut d = Map::with_capacity(2);
        d.insert(
            "roots",
            Value::Array(self.roots.iter().map(Value::from).collect()),
        );
        d.insert(
            "trees",
            Value::Array(self.roots.iter().map(|r| self.tree_value(r)).collect()),
        );
        Value::Map(d)
    }

    fn tree_value(&self, name: &str) -> Value {
        let children = self.children(name);
        if children.is_empty() {
            return Value::from(name);
        }
        let mut d = Map::with_capacity(1);
        d.insert(
            name,
            Value::Array(children.iter().map(|c| self.tree_value(c)).collect()),
        );
        Value::Map(d)
    }
}

/// The parent FQSN: everything before the last `.`, or `None` for a one-component FQSN.
fn parent_fqsn(fqsn: &str) -> Option<&str> {
    fqsn.rsplit_once('.').map(|(parent, _)| parent)
}

/// Build the hierarchy of `clients` (NVFlare's `build_client_hierarchy`). Every FQSN and every
/// name must be unique, and every parent FQSN (the FQSN without its last `.`-component) must be
/// the FQSN of one of the clients; clients with a one-component FQSN are roots.
pub fn build_client_hierarchy(clients: &[Client]) -> Result<ClientHierarchy, CoreError> {
    let mut fqsn_to_name: IndexMap<&str, &str> = IndexMap::with_capacity(clients.len());
    let mut name_to_fqsn: IndexMap<&str, &str> = IndexMap::with_capacity(clients.len());
    for c in clients {
        if let Some(other) = fqsn_to_name.get(c.fqsn.as_str()) {
            return Err(CoreError::DuplicateFqsn {
                name: c.name.clone(),
                other_name: (*other).to_owned(),
                fqsn: c.fqsn.clone(),
            });
        }
        if let Some(other) = name_to_fqsn.get(c.name.as_str()) {
            return Err(CoreError::DuplicateClientName {
                fqsn: c.fqsn.clone(),
                other_fqsn: (*other).to_owned(),
                name: c.name.clone(),
            });
        }
        fqsn_to_name.insert(&c.fqsn, &c.name);
        name_to_fqsn.insert(&c.name, &c.fqsn);
    }

    let mut forest = ClientHierarchy::default();
    for c in clients {
        forest.nodes.insert(
            c.name.clone(),
            HierarchyNode {
                fqsn: c.fqsn.clone(),
                parent: None,
                children: Vec::new(),
            },
        );
    }
    for c in clients {
        match parent_fqsn(&c.fqsn) {
            None => forest.roots.push(c.name.clone()),
            Some(parent) => {
                let Some(parent_name) = fqsn_to_name.get(parent) else {
                    return Err(CoreError::MissingParent {
                        parent: parent.to_owned(),
                        name: c.name.clone(),
                    });
                };
                if let Some(node) = forest.nodes.get_mut(c.name.as_str()) {
                    node.parent = Some((*parent_name).to_owned());
                }
                if let Some(parent_node) = forest.nodes.get_mut(*parent_name) {
                    parent_node.children.push(c.name.clone());
                }
            }
        }
    }
    Ok(forest)
}

/// Read the job clients from a job's meta (NVFlare's `get_job_clients`): the
/// meta must be a map whose `job_clients` is a list of client dicts forming a valid hierarchy.
/// Nothing is returned unless everything is valid, so the caller can swap its directory
/// atomically. An empty list is valid (no clients, no roots).
///
/// # Example
/// ```
/// use fedrun_core::{parse_job_clients, CoreError, Map, Value};
///
/// let mut meta = Map::new();
/// meta.insert("job_clients", "site-1");
/// let err = parse_job_clients(&Value::from(meta)).unwrap_err();
/// assert_eq!(err.to_string(), "invalid job_clients type: expected list but got str");
/// ```
pub fn parse_job_clients(job_meta: &Value) -> Result<(Vec<Client>, ClientHierarchy), CoreError> {
    let Value::Map(meta) = job_meta else {
        return Err(CoreError::JobMetaNotAMap(job_meta.kind()));
    };
    let list = match meta.get(JOB_CLIENTS) {
        None | Some(Value::Nil) => return Err(CoreError::MissingJobClients),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(CoreError::JobClientsNotAList(other.kind())),
    };
    let clients = list
        .iter()
        .map(Client::from_value)
        .collect::<Result<Vec<_>, _>>()?;
    let hierarchy = build_client_hierarchy(&clients)?;
    Ok((clients, hierarchy))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn client(name: &str, fqsn: &str) -> Client {
        let mut c = Client::new(name, "");
        c.fqsn = fqsn.to_owned();
        c
    }

    fn dict(pairs: &[(&str, Value)]) -> Value {
        Value::Map(pairs.iter().map(|(k, v)| (*k, v.clone())).collect())
    }

    #[test]
    fn new_client_defaults_fqcn_and_fqsn_to_its_name_and_is_a_leaf() {
        let c = Client::new("site-1", "tok");
        assert_eq!((c.fqcn.as_str(), c.fqsn.as_str()), ("site-1", "site-1"));
        assert!(c.is_leaf);
        assert_eq!(c.token, "tok");
        assert_eq!(c.site_config, None);
    }

    #[test]
    fn client_dict_fields_default_from_the_name() {
        let c = Client::from_value(&dict(&[("name", "a".into())])).unwrap();
        assert_eq!(c, Client::new("a", ""));
        let c = Client::from_value(&dict(&[
            ("name", "a".into()),
            ("fqcn", "server.a".into()),
            ("fqsn", "r.a".into()),
            ("is_leaf", false.into()),
            ("fqcn_nil_is_absent", Value::Nil),
        ]))
        .unwrap();
        assert_eq!(c.fqcn, "server.a");
        assert_eq!(c.fqsn, "r.a");
        assert!(!c.is_leaf);
    }

    #[test]
    fn client_dict_that_is_not_a_map_is_refused() {
        let err = Client::from_value(&Value::from("site-1")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expect client dict to be a dict but got str"
        );
    }

    #[test]
    fn client_dict_without_a_name_is_refused() {
        for d in [
            dict(&[]),
            dict(&[("name", "".into())]),
            dict(&[("name", Value::Nil)]),
        ] {
            let err = Client::from_value(&d).unwrap_err();
            assert_eq!(err.to_string(), "missing 'name' from client dict");
        }
    }

    #[test]
    fn client_dict_fields_of_the_wrong_type_are_refused() {
        let err = Client::from_value(&dict(&[("name", 5.into())])).unwrap_err();
        assert!(matches!(
            err,
            CoreError::ClientDictBadField { field: "name", .. }
        ));
        let err =
            Client::from_value(&dict(&[("name", "a".into()), ("is_leaf", 1.into())])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid 'is_leaf' in client dict: expected bool but got int"
        );
        let err =
            Client::from_value(&dict(&[("name", "a".into()), ("fqsn", 1.into())])).unwrap_err();
        assert!(matches!(
            err,
            CoreError::ClientDictBadField { field: "fqsn", .. }
        ));
    }

    #[test]
    fn site_config_survives_the_dict_round_trip_as_an_independent_copy() {
        let mut cfg = Map::new();
        cfg.insert("resources", dict(&[("gpu", 2.into())]));
        let mut c = Client::new("a", "");
        c.site_config = Some(Value::Map(cfg.clone()));
        let v = c.to_value();
        let mut back = Client::from_value(&v).unwrap();
        assert_eq!(back.site_config, c.site_config);
        if let Some(Value::Map(m)) = back.site_config.as_mut() {
            m.insert("resources", 0);
        }
        assert_eq!(c.site_config, Some(Value::Map(cfg)));
        let keys: Vec<_> = v
            .as_map()
            .unwrap()
            .keys()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(keys, ["name", "fqcn", "fqsn", "is_leaf", "site_config"]);
    }

    #[test]
    fn hierarchy_links_parents_and_children_in_input_order() {
        let clients = [
            client("c", "a.c"),
            client("a", "a"),
            client("b", "a.b"),
            client("d", "a.b.d"),
            client("z", "z"),
        ];
        let f = build_client_hierarchy(&clients).unwrap();
        assert_eq!(f.roots(), ["a", "z"]);
        assert_eq!(f.children("a"), ["c", "b"]);
        assert_eq!(f.children("b"), ["d"]);
        assert_eq!(f.parent("d"), Some("b"));
        assert_eq!(f.parent("a"), None);
        assert_eq!(f.node("d").map(|n| n.fqsn.as_str()), Some("a.b.d"));
        assert_eq!(f.len(), 5);
        assert_eq!(f.parent("unknown"), None);
        assert!(f.children("unknown").is_empty());
    }

    #[test]
    fn two_clients_with_one_fqsn_are_refused() {
        let err = build_client_hierarchy(&[client("a", "x"), client("b", "x")]).unwrap_err();
        assert_eq!(err.to_string(), "two names (b and a) have the same FQN x");
    }

    #[test]
    fn two_clients_with_one_name_are_refused() {
        let err = build_client_hierarchy(&[client("a", "x"), client("a", "y")]).unwrap_err();
        assert_eq!(err.to_string(), "two FQNs (y and x) have the same name a");
    }

    #[test]
    fn a_missing_parent_is_refused() {
        let err = build_client_hierarchy(&[client("a", "p.q.a")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing node definition for FQN p.q, which is the parent of a"
        );
    }

    #[test]
    fn hierarchy_value_has_the_forest_to_dict_shape() {
        let f = build_client_hierarchy(&[client("a", "a"), client("b", "a.b"), client("z", "z")])
            .unwrap();
        let v = f.to_value();
        let m = v.as_map().unwrap();
        assert_eq!(
            m.get("roots"),
            Some(&Value::from(vec![Value::from("a"), Value::from("z")]))
        );
        let expected_a = dict(&[("a", Value::from(vec![Value::from("b")]))]);
        assert_eq!(
            m.get("trees"),
            Some(&Value::from(vec![expected_a, Value::from("z")]))
        );
    }

    fn meta(clients: Value) -> Value {
        dict(&[("job_clients", clients)])
    }

    #[test]
    fn job_meta_that_is_not_a_map_is_refused() {
        let err = parse_job_clients(&Value::from(vec![])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid job meta type: expected dict but got list"
        );
    }

    #[test]
    fn job_meta_without_job_clients_is_refused_naming_the_literal_key() {
        let err = parse_job_clients(&dict(&[])).unwrap_err();
        assert_eq!(err.to_string(), "missing job_clients in job meta");
        let err = parse_job_clients(&meta("site-1".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid job_clients type: expected list but got str"
        );
    }

    #[test]
    fn empty_job_clients_give_no_clients_and_no_roots() {
        let (clients, forest) = parse_job_clients(&meta(Value::from(vec![]))).unwrap();
        assert!(clients.is_empty());
        assert!(forest.is_empty());
        assert!(forest.roots().is_empty());
    }

    #[test]
    fn job_clients_are_parsed_in_order_with_their_hierarchy() {
        let list = vec![
            Client::new("site-1", "").to_value(),
            client("site-2", "site-1.site-2").to_value(),
        ];
        let (clients, forest) = parse_job_clients(&meta(Value::from(list))).unwrap();
        let names: Vec<_> = clients.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["site-1", "site-2"]);
        assert_eq!(forest.children("site-1"), ["site-2"]);
    }

    #[test]
    fn a_bad_client_or_hierarchy_fails_the_whole_parse() {
        let list = vec![Client::new("a", "").to_value(), Value::from(3)];
        assert!(matches!(
            parse_job_clients(&meta(Value::from(list))),
            Err(CoreError::ClientDictNotAMap("int"))
        ));
        let list = vec![
            Client::new("a", "").to_value(),
            Client::new("a", "").to_value(),
        ];
        assert!(matches!(
            parse_job_clients(&meta(Value::from(list))),
            Err(CoreError::DuplicateFqsn { .. })
        ));
    }
}
