//! The part of HOCON that NVFlare's job configs use (`config_fed_client.conf` and friends).
//!
//! NVFlare reads a job config from `.json` or, failing that, `.conf` (HOCON, through pyhocon).
//! Its job templates write `.conf` files with comments, unquoted keys, `=` as well as `:`, keys
//! with dots (`args.key_metric = "accuracy"`), objects without a separator (`args { ... }`) and
//! substitutions (`${var}`). The Rust HOCON crate (`hocon` 0.9) is not maintained (it pins nom 4
//! and pulls an HTTP client by default), so this module parses that subset into JSON itself:
//!
//! - the root is an object, with or without braces; `#` and `//` comments;
//! - keys quoted or unquoted, dotted keys make nested objects; `:` or `=`, or nothing before `{`;
//! - values: JSON strings, `"""` strings, numbers, `true`/`false`/`null`, arrays, objects, and
//!   unquoted strings (up to the end of the line, `,`, `]`, `}` or a comment);
//! - entries end with a comma or a newline (trailing commas allowed);
//! - a key given twice: objects merge, anything else is replaced by the later value;
//! - `${path}` (an error when unresolved) and `${?path}` (the field is dropped when unresolved),
//!   resolved against the whole document, then the environment; a value made of several pieces
//!   (`"a" ${x} b`) is their concatenation as a string.
//!
//! Refused with an error: `include`, `+=`, and self-referential substitutions.

use serde_json::{Map as JsonMap, Value as Json};

/// How deep objects and arrays (and substitution chains) may nest.
pub const MAX_DEPTH: usize = 128;

/// A HOCON syntax or substitution error, with the 1-based line where it was found (0: found
/// while resolving substitutions).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct HoconError {
    /// The line (1-based; 0 when found while resolving).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// A parsed value before substitutions are resolved.
#[derive(Clone, Debug)]
enum Node {
    Object(Vec<(String, Node)>),
    Array(Vec<Node>),
    Scalar(Json),
    /// Pieces to concatenate (at least one substitution, or several pieces).
    Concat(Vec<Piece>),
}

#[derive(Clone, Debug)]
enum Piece {
    Text(Json),
    Subst { path: String, optional: bool },
}

/// Parses HOCON text into JSON (see the module doc for the subset).
///
/// # Example
/// ```
/// use fedrun_cli::hocon::parse;
///
/// let conf = r#"
///   // a comment (rustdoc would hide a line starting with '#')
///   format_version = 2
///   rounds: 3
///   workflows = [
///     { id = "sag", args { num_rounds = ${rounds}, name = plain text } }
///   ]
///   components = [ { id: a, args.expected_data_kind = "WEIGHTS" }, ]
/// "#;
/// let json = parse(conf).unwrap();
/// assert_eq!(json["workflows"][0]["args"]["num_rounds"], 3);
/// assert_eq!(json["workflows"][0]["args"]["name"], "plain text");
/// assert_eq!(json["components"][0]["args"]["expected_data_kind"], "WEIGHTS");
/// assert!(parse("a = ${missing}").is_err());
/// ```
pub fn parse(text: &str) -> Result<Json, HoconError> {
    let mut p = Parser {
        chars: text.chars().collect(),
        pos: 0,
        line: 1,
    };
    p.skip_ws_and_comments(true);
    let root = if p.peek() == Some('{') {
        p.bump();
        let o = p.object_body(Some('}'), 1)?;
        p.skip_ws_and_comments(true);
        if p.peek().is_some() {
            return Err(p.err("unexpected text after the root object"));
        }
        o
    } else {
        p.object_body(None, 1)?
    };
    let resolver = Resolver { root: &root };
    match resolver.resolve(&root, 0)? {
        Some(v) => Ok(v),
        None => Ok(Json::Object(JsonMap::new())),
    }
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    line: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.chars.get(self.pos + n).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn err(&self, reason: impl Into<String>) -> HoconError {
        HoconError {
            line: self.line,
            reason: reason.into(),
        }
    }

    fn at_comment(&self) -> bool {
        self.peek() == Some('#') || (self.peek() == Some('/') && self.peek_at(1) == Some('/'))
    }

    fn skip_comment(&mut self) {
        while let Some(c) = self.peek() {
            if c == '\n' {
                break;
            }
            self.bump();
        }
    }

    /// Skips blanks and comments; newlines too when `newlines`. Returns whether it saw one.
    fn skip_ws_and_comments(&mut self, newlines: bool) -> bool {
        let mut saw_newline = false;
        while let Some(c) = self.peek() {
            if c == '\n' {
                if !newlines {
                    break;
                }
                saw_newline = true;
                self.bump();
            } else if c.is_whitespace() || c == '\u{feff}' {
                self.bump();
            } else if self.at_comment() {
                self.skip_comment();
            } else {
                break;
            }
        }
        saw_newline
    }

    /// Entries up to `close` (or the end of the text for a braceless root).
    fn object_body(&mut self, close: Option<char>, depth: usize) -> Result<Node, HoconError> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!("nested deeper than {MAX_DEPTH}")));
        }
        let mut fields: Vec<(String, Node)> = Vec::new();
        loop {
            self.skip_ws_and_comments(true);
            match (self.peek(), close) {
                (None, None) => return Ok(Node::Object(fields)),
                (None, Some(c)) => return Err(self.err(format!("missing '{c}'"))),
                (Some(c), Some(close)) if c == close => {
                    self.bump();
                    return Ok(Node::Object(fields));
                }
                (Some(','), _) => {
                    self.bump();
                    continue;
                }
                _ => {}
            }
            let path = self.key_path()?;
            if path.first().map(String::as_str) == Some("include") && path.len() == 1 {
                if let Some('"') = self.peek_after_blanks() {
                    return Err(self.err("'include' is not supported"));
                }
            }
            self.skip_ws_and_comments(false);
            match self.peek() {
                Some(':') | Some('=') => {
                    self.bump();
                }
                Some('+') if self.peek_at(1) == Some('=') => {
                    return Err(self.err("'+=' is not supported"))
                }
                Some('{') => {}
                _ => {
                    return Err(self.err(format!(
                        "expected ':', '=' or '{{' after key {}",
                        path.join(".")
                    )))
                }
            }
            self.skip_ws_and_comments(false);
            let value = self.value(depth)?;
            insert_path(&mut fields, &path, value);
            // an entry ends with a comma, a newline, or the closing brace
            let newline = self.skip_ws_and_comments(true);
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(c) if Some(c) == close => {}
                None => {}
                Some(_) if newline => {}
                Some(c) => return Err(self.err(format!("unexpected '{c}' after a value"))),
            }
        }
    }

    fn peek_after_blanks(&self) -> Option<char> {
        self.chars[self.pos..]
            .iter()
            .copied()
            .find(|c| *c != ' ' && *c != '\t')
    }

    /// A key: dot-separated segments, each quoted or unquoted.
    fn key_path(&mut self) -> Result<Vec<String>, HoconError> {
        let mut path = Vec::new();
        loop {
            let segment = match self.peek() {
                Some('"') => self.quoted_string()?,
                _ => {
                    let mut s = String::new();
                    while let Some(c) = self.peek() {
                        if c.is_whitespace()
                            || matches!(c, '.' | ':' | '=' | '{' | '}' | '[' | ']' | ',' | '"')
                            || self.at_comment()
                            || (c == '+' && self.peek_at(1) == Some('='))
                        {
                            break;
                        }
                        s.push(c);
                        self.bump();
                    }
                    if s.is_empty() {
                        return Err(self.err(match self.peek() {
                            Some(c) => format!("expected a key, found '{c}'"),
                            None => "expected a key".to_owned(),
                        }));
                    }
                    s
                }
            };
            path.push(segment);
            if self.peek() == Some('.') {
                self.bump();
            } else {
                return Ok(path);
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, HoconError> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!("nested deeper than {MAX_DEPTH}")));
        }
        match self.peek() {
            Some('{') => {
                self.bump();
                self.object_body(Some('}'), depth + 1)
            }
            Some('[') => {
                self.bump();
                self.array(depth + 1)
            }
            _ => self.concatenation(),
        }
    }

    fn array(&mut self, depth: usize) -> Result<Node, HoconError> {
        let mut items = Vec::new();
        loop {
            self.skip_ws_and_comments(true);
            match self.peek() {
                None => return Err(self.err("missing ']'")),
                Some(']') => {
                    self.bump();
                    return Ok(Node::Array(items));
                }
                Some(',') => {
                    self.bump();
                    continue;
                }
                _ => {}
            }
            items.push(self.value(depth)?);
            let newline = self.skip_ws_and_comments(true);
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(']') => {}
                Some(_) if newline => {}
                Some(c) => return Err(self.err(format!("unexpected '{c}' in an array"))),
                None => return Err(self.err("missing ']'")),
            }
        }
    }

    /// A simple value: pieces on one line up to `,` `]` `}` or a comment.
    fn concatenation(&mut self) -> Result<Node, HoconError> {
        let mut pieces: Vec<Piece> = Vec::new();
        let mut unquoted = String::new();
        let flush = |unquoted: &mut String, pieces: &mut Vec<Piece>| {
            if !unquoted.is_empty() {
                pieces.push(Piece::Text(Json::String(std::mem::take(unquoted))));
            }
        };
        loop {
            match self.peek() {
                None | Some('\n' | ',' | ']' | '}') => break,
                _ if self.at_comment() => break,
                Some('"') => {
                    flush(&mut unquoted, &mut pieces);
                    let s = if self.peek_at(1) == Some('"') && self.peek_at(2) == Some('"') {
                        self.triple_quoted()?
                    } else {
                        self.quoted_string()?
                    };
                    pieces.push(Piece::Text(Json::String(s)));
                }
                Some('$') if self.peek_at(1) == Some('{') => {
                    flush(&mut unquoted, &mut pieces);
                    self.bump();
                    self.bump();
                    let optional = self.peek() == Some('?');
                    if optional {
                        self.bump();
                    }
                    let mut path = String::new();
                    loop {
                        match self.bump() {
                            Some('}') => break,
                            Some('\n') | None => return Err(self.err("unclosed '${'")),
                            Some(c) => path.push(c),
                        }
                    }
                    let path = path.trim().trim_matches('"').to_owned();
                    if path.is_empty() {
                        return Err(self.err("empty substitution '${}'"));
                    }
                    pieces.push(Piece::Subst { path, optional });
                }
                Some('{' | '[') => return Err(self.err("an object or array cannot follow text")),
                Some(c) => {
                    unquoted.push(c);
                    self.bump();
                }
            }
        }
        // blanks between the value and the end of the line are not part of it
        let trimmed = unquoted.trim_end().to_owned();
        unquoted = trimmed;
        flush(&mut unquoted, &mut pieces);
        match pieces.len() {
            0 => Err(self.err("missing value")),
            1 => match pieces.pop() {
                Some(Piece::Text(Json::String(s))) => Ok(Node::Scalar(self.scalar(s))),
                Some(p) => Ok(Node::Concat(vec![p])),
                None => Err(self.err("missing value")),
            },
            _ => Ok(Node::Concat(pieces)),
        }
    }

    /// Unquoted text as a number, bool, null or string.
    fn scalar(&self, text: String) -> Json {
        match text.as_str() {
            "true" => return Json::Bool(true),
            "false" => return Json::Bool(false),
            "null" => return Json::Null,
            _ => {}
        }
        let numeric = text
            .chars()
            .next()
            .is_some_and(|c| c == '-' || c.is_ascii_digit());
        if numeric {
            if let Ok(n) = serde_json::from_str::<serde_json::Number>(&text) {
                return Json::Number(n);
            }
        }
        Json::String(text)
    }

    fn quoted_string(&mut self) -> Result<String, HoconError> {
        let start = self.pos;
        let start_line = self.line;
        self.bump();
        let mut escaped = false;
        loop {
            match self.bump() {
                None | Some('\n') => {
                    return Err(HoconError {
                        line: start_line,
                        reason: "unterminated string".to_owned(),
                    })
                }
                Some('\\') if !escaped => escaped = true,
                Some('"') if !escaped => break,
                Some(_) => escaped = false,
            }
        }
        let raw: String = self.chars[start..self.pos].iter().collect();
        serde_json::from_str::<String>(&raw).map_err(|e| HoconError {
            line: start_line,
            reason: format!("bad string {raw}: {e}"),
        })
    }

    fn triple_quoted(&mut self) -> Result<String, HoconError> {
        let start_line = self.line;
        for _ in 0..3 {
            self.bump();
        }
        let mut s = String::new();
        loop {
            if self.peek() == Some('"')
                && self.peek_at(1) == Some('"')
                && self.peek_at(2) == Some('"')
            {
                // extra quotes before the closing three belong to the string
                while self.peek_at(3) == Some('"') {
                    s.push('"');
                    self.bump();
                }
                for _ in 0..3 {
                    self.bump();
                }
                return Ok(s);
            }
            match self.bump() {
                Some(c) => s.push(c),
                None => {
                    return Err(HoconError {
                        line: start_line,
                        reason: "unterminated \"\"\" string".to_owned(),
                    })
                }
            }
        }
    }
}

/// Sets `path` in `fields`: objects merge into objects, anything else replaces.
fn insert_path(fields: &mut Vec<(String, Node)>, path: &[String], value: Node) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let value = if rest.is_empty() {
        value
    } else {
        let mut inner = Vec::new();
        insert_path(&mut inner, rest, value);
        Node::Object(inner)
    };
    match fields.iter_mut().find(|(k, _)| k == first) {
        Some((_, existing)) => merge(existing, value),
        None => fields.push((first.clone(), value)),
    }
}

fn merge(existing: &mut Node, value: Node) {
    match (existing, value) {
        (Node::Object(old), Node::Object(new)) => {
            for (k, v) in new {
                insert_path(old, &[k], v);
            }
        }
        (slot, value) => *slot = value,
    }
}

struct Resolver<'a> {
    root: &'a Node,
}

impl Resolver<'_> {
    /// The JSON of `node`; `None` for an optional substitution that did not resolve.
    fn resolve(&self, node: &Node, depth: usize) -> Result<Option<Json>, HoconError> {
        let fail = |reason: String| HoconError { line: 0, reason };
        if depth > MAX_DEPTH {
            return Err(fail(format!(
                "substitutions nest deeper than {MAX_DEPTH} (a cycle?)"
            )));
        }
        Ok(Some(match node {
            Node::Scalar(v) => v.clone(),
            Node::Object(fields) => {
                let mut map = JsonMap::new();
                for (k, v) in fields {
                    if let Some(v) = self.resolve(v, depth + 1)? {
                        map.insert(k.clone(), v);
                    }
                }
                Json::Object(map)
            }
            Node::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    if let Some(v) = self.resolve(item, depth + 1)? {
                        out.push(v);
                    }
                }
                Json::Array(out)
            }
            Node::Concat(pieces) => {
                let mut values = Vec::with_capacity(pieces.len());
                for piece in pieces {
                    match piece {
                        Piece::Text(v) => values.push(v.clone()),
                        Piece::Subst { path, optional } => match self.lookup(path, depth)? {
                            Some(v) => values.push(v),
                            None if *optional => {}
                            None => {
                                return Err(fail(format!("unresolved substitution ${{{path}}}")))
                            }
                        },
                    }
                }
                match values.len() {
                    0 => return Ok(None),
                    1 => values.pop().unwrap_or(Json::Null),
                    _ => Json::String(values.iter().map(concat_text).collect()),
                }
            }
        }))
    }

    fn lookup(&self, path: &str, depth: usize) -> Result<Option<Json>, HoconError> {
        let mut node = self.root;
        let mut found = true;
        for segment in path.split('.') {
            match node {
                Node::Object(fields) => match fields.iter().find(|(k, _)| k == segment) {
                    Some((_, v)) => node = v,
                    None => {
                        found = false;
                        break;
                    }
                },
                _ => {
                    found = false;
                    break;
                }
            }
        }
        if found {
            return self.resolve(node, depth + 1);
        }
        Ok(std::env::var(path).ok().map(Json::String))
    }
}

/// A value's text in a string concatenation.
fn concat_text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Null => "null".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn nvflare_template_syntax_parses_to_the_same_json() {
        let conf = r#"
{
  # version of the configuration
  format_version = 2
  task_data_filters =[]
  // another comment style
  workflows = [
      {
        id = "scatter_and_gather"
        path = "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather"
        args {
            min_clients = 2
            num_rounds = 5
            train_timeout =  0
            ratio = -1.5e2
        }
      }
  ]
  components = [
    {
      id = "persistor"
      path = "nvflare.app_common.np.np_model_persistor.NPModelPersistor"

    },
    {
      id = "aggregator"
      args.expected_data_kind = "WEIGHTS"
      args.weights { site-1 = 1.0 }
    }
  ]
}
"#;
        let j = parse(conf).unwrap();
        assert_eq!(j["format_version"], json!(2));
        assert_eq!(j["task_data_filters"], json!([]));
        assert_eq!(
            j["workflows"][0]["args"],
            json!({"min_clients": 2, "num_rounds": 5, "train_timeout": 0, "ratio": -150.0})
        );
        assert_eq!(
            j["components"][1]["args"],
            json!({"expected_data_kind": "WEIGHTS", "weights": {"site-1": 1.0}})
        );
        assert_eq!(j["components"][0].as_object().unwrap().len(), 2);
    }

    #[test]
    fn substitutions_duplicates_and_unquoted_strings() {
        let conf = r#"
            app_script = "cifar10.py"
            n = 3
            cmd = "python3 -u custom/"${app_script}" --n "${n}
            maybe = ${?NOT_DEFINED_ANYWHERE_FEDRUN}
            a { x = 1, y = 2 }
            a { y = 3 }
            b = 1
            b = two words
            list = [1
              2, "three" # comment
            ]
            nested = ${a}
        "#;
        let j = parse(conf).unwrap();
        assert_eq!(j["cmd"], json!("python3 -u custom/cifar10.py --n 3"));
        assert!(j.get("maybe").is_none());
        assert_eq!(j["a"], json!({"x": 1, "y": 3}));
        assert_eq!(j["b"], json!("two words"));
        assert_eq!(j["list"], json!([1, 2, "three"]));
        assert_eq!(j["nested"], json!({"x": 1, "y": 3}));
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse("a = 1\nb = \"open\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(parse("a = [1, 2").is_err());
        assert!(parse("include \"other.conf\"").is_err());
        assert!(parse("a += 1").is_err());
        let cycle = parse("a = ${b}\nb = ${a}").unwrap_err();
        assert!(cycle.reason.contains("deeper"), "{cycle}");
        assert!(parse("a = ${nope_fedrun_undefined}").is_err());
        assert!(parse("{ a = 1 } trailing").is_err());
    }
}
