//! NVFlare's job-config variables: `"{name}"` and `"... {name} ..."` inside config strings.
//!
//! When NVFlare's client job builds its app config it first resolves variable references in
//! every string of the config (keys are left alone), against: every top-level entry of the
//! config, then the system variables (`SITE_NAME`, `WORKSPACE`, `JOB_ID`, ...; they win), then
//! the environment as `$NAME` (only where the name is not already defined). The rules, as
//! NVFlare applies them:
//!
//! - a string that is, once trimmed, exactly one `{name}` (no other braces) becomes the
//!   variable's value with its type (a number stays a number, an object an object); an unknown
//!   name becomes `null`;
//! - any other string is run through Python's `str.format` with the variables: `{name}` is
//!   replaced by the value's text, `{{`/`}}` by a brace; if that fails (an unknown name, a
//!   positional `{}` or `{0}`, an unbalanced brace) the string is left as it is. fedrun also
//!   leaves the string as it is for format specs, conversions, attribute and index lookups
//!   (`{x:>4}`, `{x!r}`, `{x.y}`, `{x[0]}`), which Python would apply;
//! - `${secret:...}` references are kept for the site's secret resolver;
//! - the scan repeats until nothing changes (a value may itself refer to variables), at most
//!   [`MAX_ROUNDS`] times (a cycle is an error).
//!
//! Parameterized definitions (`"@name"` entries invoked as `{@name:k=v}`) are not supported:
//! such a reference is an error naming it.

use serde_json::{Map as JsonMap, Value as Json};

/// The most scans NVFlare makes before calling the references cyclic.
pub const MAX_ROUNDS: usize = 20;

/// Resolves the variable references of `config` in place (see the module doc).
///
/// `sys_vars` are NVFlare's system variables; with `with_env`, environment variables are
/// visible as `$NAME`.
///
/// # Example
/// ```
/// use fedrun_cli::config_vars::substitute;
/// use serde_json::json;
///
/// let mut c = json!({
///     "app_script": "train.py", "rounds": 3,
///     "executors": [{"args": {"command": "python3 custom/{app_script} --site {SITE_NAME}",
///                             "rounds": "{rounds}", "missing": "{nope}", "odd": "x {0}"}}]
/// });
/// let sys = json!({"SITE_NAME": "site-1"});
/// substitute(&mut c, sys.as_object().unwrap(), false).unwrap();
/// let args = &c["executors"][0]["args"];
/// assert_eq!(args["command"], "python3 custom/train.py --site site-1");
/// assert_eq!(args["rounds"], 3);
/// assert_eq!(args["missing"], serde_json::Value::Null);
/// assert_eq!(args["odd"], "x {0}"); // Python's format fails: left as it is
/// ```
pub fn substitute(
    config: &mut Json,
    sys_vars: &JsonMap<String, Json>,
    with_env: bool,
) -> Result<(), String> {
    let mut vars: JsonMap<String, Json> = match config.as_object() {
        Some(top) => top.clone(),
        None => JsonMap::new(),
    };
    // parameterized definitions are only templates: they leave the config
    if let Some(top) = config.as_object_mut() {
        top.retain(|k, _| !k.starts_with('@'));
    }
    for (k, v) in sys_vars {
        vars.insert(k.clone(), v.clone());
    }
    if with_env {
        for (k, v) in std::env::vars() {
            vars.entry(format!("${k}")).or_insert(Json::String(v));
        }
    }
    for _ in 0..=MAX_ROUNDS {
        let mut changed = 0usize;
        walk(config, &vars, &mut changed)?;
        if changed == 0 {
            return Ok(());
        }
    }
    Err(format!(
        "variable references still change after {MAX_ROUNDS} rounds: cyclic refs or ref level \
         too deep"
    ))
}

fn walk(v: &mut Json, vars: &JsonMap<String, Json>, changed: &mut usize) -> Result<(), String> {
    match v {
        Json::String(s) => {
            if let Some(new) = substitute_str(s, vars)? {
                *v = new;
                *changed += 1;
            }
            Ok(())
        }
        Json::Array(items) => items.iter_mut().try_for_each(|i| walk(i, vars, changed)),
        Json::Object(map) => map.values_mut().try_for_each(|i| walk(i, vars, changed)),
        _ => Ok(()),
    }
}

/// The new value of one string, `None` when it stays as it is.
fn substitute_str(s: &str, vars: &JsonMap<String, Json>) -> Result<Option<Json>, String> {
    let exp = s.trim();
    if exp.starts_with("{@") && exp.ends_with('}') {
        return Err(format!(
            "parameterized reference '{s}' is not supported by fedrun"
        ));
    }
    if let Some(inner) = exp.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
        if !inner.contains(['{', '}']) {
            if inner.contains(':') {
                return Err(format!(
                    "parameterized reference '{s}' is not supported by fedrun"
                ));
            }
            let value = vars.get(inner).cloned().unwrap_or(Json::Null);
            return Ok((value != Json::String(s.to_owned())).then_some(value));
        }
    }
    Ok(format(s, vars).filter(|new| new != s).map(Json::String))
}

/// Python's `str.format(**vars)` for plain `{name}` fields; `None` where Python would raise
/// or fedrun does not follow (see the module doc).
fn format(s: &str, vars: &JsonMap<String, Json>) -> Option<String> {
    const SECRET: &str = "${secret:";
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(['{', '}', '$']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with(SECRET) {
            // kept verbatim up to its closing brace
            let end = tail.find('}')?;
            out.push_str(&tail[..=end]);
            rest = &tail[end + 1..];
        } else if let Some(after) = tail.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
        } else if tail.starts_with('}') {
            return None; // single '}' encountered in format string
        } else {
            let end = tail.find('}')?;
            let field = &tail[1..end];
            let plain = !field.is_empty()
                && !field.contains(['{', '!', ':', '.', '['])
                && !field.chars().all(|c| c.is_ascii_digit());
            if !plain {
                return None;
            }
            out.push_str(&python_str(vars.get(field)?));
            rest = &tail[end + 1..];
        }
    }
    out.push_str(rest);
    Some(out)
}

/// Python's `str()` of a JSON value (dicts and lists approximated by their JSON text).
pub(crate) fn python_str(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Bool(true) => "True".to_owned(),
        Json::Bool(false) => "False".to_owned(),
        Json::Null => "None".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn run(mut c: Json, sys: Json) -> Result<Json, String> {
        substitute(&mut c, sys.as_object().unwrap(), false).map(|()| c)
    }

    #[test]
    fn whole_references_keep_types_and_strings_are_formatted() {
        let c = run(
            json!({"n": 2, "flag": true, "obj": {"a": 1}, "x": {
                "n": "{n}", "o": " {obj} ", "t": "n={n} flag={flag}", "b": "{{literal}} {n}",
                "s": "${secret:DB_PASS} {n}", "spec": "at {n:>3}", "lone": "a } b"}}),
            json!({}),
        )
        .unwrap();
        let x = &c["x"];
        assert_eq!(x["n"], json!(2));
        assert_eq!(x["o"], json!({"a": 1}));
        assert_eq!(x["t"], json!("n=2 flag=True"));
        assert_eq!(x["b"], json!("{literal} 2"));
        assert_eq!(x["s"], json!("${secret:DB_PASS} 2"));
        assert_eq!(
            x["spec"],
            json!("at {n:>3}"),
            "format specs are not applied"
        );
        assert_eq!(x["lone"], json!("a } b"));
    }

    #[test]
    fn system_variables_win_and_chains_resolve() {
        let c = run(
            json!({"JOB_ID": "mine", "dir": "{WORKSPACE}/{JOB_ID}", "path": "{dir}/m.npy"}),
            json!({"JOB_ID": "j1", "WORKSPACE": "/ws"}),
        )
        .unwrap();
        assert_eq!(c["path"], json!("/ws/j1/m.npy"));
        assert_eq!(
            c["JOB_ID"],
            json!("mine"),
            "only strings that refer are replaced"
        );
    }

    #[test]
    fn cycles_and_parameterized_refs_are_errors() {
        let err = run(json!({"a": "x{b}", "b": "{a}"}), json!({})).unwrap_err();
        assert!(err.contains("cyclic"), "{err}");
        assert!(run(json!({"x": "{@tpl:k=1}"}), json!({}))
            .unwrap_err()
            .contains("{@tpl:k=1}"));
        let c = run(json!({"@tpl": {"a": 1}, "y": 1}), json!({})).unwrap();
        assert!(c.get("@tpl").is_none());
    }
}
