//! The `table` role: one markdown table of NVFlare's aux path, fedrun, and the C loopback limits,
//! from the results of one interleaved session (`vs-nvflare.sh`), followed by fedrun's
//! performance targets checked against the same run's figures.
//!
//! Inputs: NVFlare's `results/<tag>.json` (written by `cellbench.py`), fedrun's `<tag>.json`
//! (written by `fedrun-cellbench run`, same format), and the C limits as JSON lines (the output
//! of `netlimits`). Every figure is the median over the session's rounds. Rows marked `[core]`
//! compare the core paths (NVFlare's `CoreCell`, fedrun's plain `Cell`): their NVFlare column
//! holds NVFlare's core figure.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value as Json;

use crate::args::TableOptions;
use crate::error::BenchError;
use crate::measure::median;

/// The C loopback limits measured in the session (medians).
#[derive(Clone, Debug, Default)]
pub struct Limits {
    values: HashMap<String, Vec<f64>>,
}

impl Limits {
    /// Reads `netlimits` output lines (`{"mode": "pingpong", "p50_us": …}`, …); lines that are
    /// not JSON objects are skipped.
    ///
    /// # Example
    ///
    /// ```
    /// use fedrun_bench::report::Limits;
    ///
    /// let l = Limits::parse("{\"mode\":\"pingpong\",\"p50_us\":50}\n\
    ///                        {\"mode\":\"pingpong\",\"p50_us\":60}\n\
    ///                        {\"mode\":\"pipeline\",\"depth\":64,\"rps\":200000}\n");
    /// assert_eq!(l.get("pingpong.p50_us"), Some(55.0));
    /// assert_eq!(l.get("pipeline64.rps"), Some(200000.0));
    /// assert_eq!(l.get("bulk.mib_s"), None);
    /// ```
    pub fn parse(text: &str) -> Limits {
        let mut values: HashMap<String, Vec<f64>> = HashMap::new();
        for line in text.lines() {
            let Ok(Json::Object(m)) = serde_json::from_str::<Json>(line.trim()) else {
                continue;
            };
            let Some(mode) = m.get("mode").and_then(Json::as_str) else {
                continue;
            };
            let mode = match m.get("depth").and_then(Json::as_u64) {
                Some(d) => format!("{mode}{d}"),
                None => mode.to_owned(),
            };
            for (k, v) in &m {
                if let Some(x) = v.as_f64() {
                    values.entry(format!("{mode}.{k}")).or_default().push(x);
                }
            }
        }
        Limits { values }
    }

    /// The median of `mode.field` over the session.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.get(key).and_then(|v| median(v))
    }

    /// How many measurements of `mode.field` there are.
    pub fn count(&self, key: &str) -> usize {
        self.values.get(key).map_or(0, Vec::len)
    }
}

/// The results files of one implementation.
#[derive(Clone, Debug, Default)]
pub struct Results {
    files: HashMap<String, Json>,
}

impl Results {
    /// Reads every `<tag>.json` of `dir` (a missing folder gives no results).
    ///
    /// # Errors
    ///
    /// A file that cannot be read or is not JSON.
    pub fn load(dir: &Path) -> Result<Results, BenchError> {
        let mut files = HashMap::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(Results { files });
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Some(tag) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            let text = std::fs::read_to_string(&path).map_err(|source| BenchError::File {
                path: path.clone(),
                source,
            })?;
            files.insert(tag, serde_json::from_str(&text)?);
        }
        Ok(Results { files })
    }

    /// Results from already-parsed files, by tag.
    pub fn from_files(files: HashMap<String, Json>) -> Results {
        Results { files }
    }

    /// The median of summary figure `key` of `tag`.
    pub fn median(&self, tag: &str, key: &str) -> Option<f64> {
        self.files
            .get(tag)?
            .get("summary")?
            .get(key)?
            .get("median")?
            .as_f64()
    }

    /// How many good runs `tag` has.
    pub fn runs(&self, tag: &str) -> usize {
        self.files
            .get(tag)
            .and_then(|f| f.get("runs"))
            .and_then(Json::as_array)
            .map_or(0, |r| r.iter().filter(|x| x.get("error").is_none()).count())
    }

    /// Total failed operations (`errors` fields) over the good runs of `tag`.
    pub fn op_errors(&self, tag: &str) -> u64 {
        self.files
            .get(tag)
            .and_then(|f| f.get("runs"))
            .and_then(Json::as_array)
            .map_or(0, |r| {
                r.iter()
                    .filter_map(|x| x.get("errors").and_then(Json::as_u64))
                    .sum()
            })
    }

    /// Peak RSS minus idle RSS (MiB) of `who` in `tag`, from the medians.
    pub fn rss_growth(&self, tag: &str, who: &str) -> Option<f64> {
        let peak = self.median(tag, &format!("{who}_peak_rss_mib"))?;
        let idle = self.median(tag, &format!("{who}_idle_rss_mib"))?;
        Some(peak - idle)
    }
}

/// Which way a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Better {
    Lower,
    Higher,
}

/// A C loopback figure a row is compared with.
struct CLimit {
    label: String,
    value: f64,
    /// Extra context after the figure (e.g. the pinned variants).
    note: String,
}

struct Row {
    scenario: String,
    nv: Option<f64>,
    fr: Option<f64>,
    unit: &'static str,
    better: Better,
    c: Option<CLimit>,
}

/// `1234.5` → `1,235` (or with `digits` decimals).
fn num(v: f64, digits: usize) -> String {
    let s = format!("{:.*}", digits, v.abs());
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let mut out = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if let Some(f) = frac {
        out.push('.');
        out.push_str(f);
    }
    if v < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A figure with sensible precision.
fn fig(v: f64, unit: &str) -> String {
    let digits = if v.abs() >= 100.0 {
        0
    } else if v.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{} {unit}", num(v, digits)).trim_end().to_owned()
}

fn times(x: f64) -> String {
    if x >= 10.0 {
        format!("{}×", num(x, 1))
    } else {
        format!("{}×", num(x, 2))
    }
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        let (nv, fr) = (self.nv?, self.fr?);
        if nv <= 0.0 || fr <= 0.0 {
            return None;
        }
        Some(match self.better {
            Better::Lower => nv / fr,
            Better::Higher => fr / nv,
        })
    }

    fn render(&self) -> String {
        let show = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| fig(v, self.unit));
        let ratio = match self.ratio() {
            None => "n/a".to_owned(),
            Some(r) => {
                // r > 1: fedrun is better by r; r < 1: worse by 1/r.
                let (better, worse) = match (self.better, self.unit) {
                    (Better::Lower, "MiB") => ("less", "more"),
                    (Better::Lower, _) | (Better::Higher, "MiB/s") => ("faster", "slower"),
                    (Better::Higher, _) => ("more", "fewer"),
                };
                if r >= 1.0 {
                    format!("{} {better}", times(r))
                } else {
                    format!("{} {worse}", times(1.0 / r))
                }
            }
        };
        let (c_text, vs_c) = match (&self.c, self.fr) {
            (Some(l), fr) => {
                let text = format!("{} {}{}", l.label, fig(l.value, self.unit), l.note);
                let vs = match (fr, self.better) {
                    (Some(fr), Better::Lower) if l.value > 0.0 => {
                        format!("{} C", times(fr / l.value))
                    }
                    (Some(fr), Better::Higher) if l.value > 0.0 => {
                        format!("{} %", num(100.0 * fr / l.value, 0))
                    }
                    _ => "n/a".to_owned(),
                };
                (text, vs)
            }
            (None, _) => ("—".to_owned(), "—".to_owned()),
        };
        format!(
            "| {} | {} | {} | {} | {} | {} |",
            self.scenario,
            show(self.nv),
            show(self.fr),
            ratio,
            c_text,
            vs_c
        )
    }
}

/// Builds the markdown table and the targets list.
///
/// # Example
///
/// ```
/// use std::collections::HashMap;
/// use fedrun_bench::report::{render, Limits, Results};
///
/// let file = |p50: f64| serde_json::json!({"summary": {"p50_us": {"median": p50}}, "runs": [{}]});
/// let nv = Results::from_files(HashMap::from([("latency-aux".to_string(), file(1500.0))]));
/// let fr = Results::from_files(HashMap::from([("latency-aux".to_string(), file(100.0))]));
/// let limits = Limits::parse("{\"mode\":\"pingpong\",\"p50_us\":50}");
/// let text = render(&nv, &fr, &limits);
/// assert!(text.contains("| scenario | NVFlare aux | fedrun | ratio | C limit | fedrun / C |"));
/// assert!(text.contains("15.0× faster"));
/// assert!(text.contains("2.00× C"));
/// ```
pub fn render(nv: &Results, fr: &Results, limits: &Limits) -> String {
    let pp50 = limits.get("pingpong.p50_us");
    let pp_note = match (
        limits.get("pingpong_same.p50_us"),
        limits.get("pingpong_cross.p50_us"),
    ) {
        (Some(same), Some(cross)) => format!(
            " (pinned: same CPU {}, cross CPU {})",
            fig(same, "µs"),
            fig(cross, "µs")
        ),
        _ => String::new(),
    };
    let pp99 = limits.get("pingpong.p99_us");
    let c = |label: &str, v: Option<f64>| {
        v.map(|v| CLimit {
            label: label.to_owned(),
            value: v,
            note: String::new(),
        })
    };
    let mut rows = Vec::new();
    let mut push = |scenario: String,
                    tag: &str,
                    key: &str,
                    unit: &'static str,
                    better: Better,
                    c: Option<CLimit>| {
        rows.push(Row {
            scenario,
            nv: nv.median(tag, key),
            fr: fr.median(tag, key),
            unit,
            better,
            c,
        });
    };
    for path in ["aux", "core"] {
        let mark = if path == "core" { "[core] " } else { "" };
        let tag = format!("latency-{path}");
        push(
            format!("{mark}round trip ~100 B, sequential, p50"),
            &tag,
            "p50_us",
            "µs",
            Better::Lower,
            c("C TCP ping-pong", pp50).map(|l| CLimit {
                note: pp_note.clone(),
                ..l
            }),
        );
        push(
            format!("{mark}round trip ~100 B, sequential, p99"),
            &tag,
            "p99_us",
            "µs",
            Better::Lower,
            c("C TCP ping-pong", pp99),
        );
        for depth in [16, 64] {
            push(
                format!("{mark}requests/s, {depth} in flight"),
                &format!("throughput-{path}-c{depth}"),
                "rps",
                "req/s",
                Better::Higher,
                c(
                    &format!("C echo, {depth} in flight"),
                    limits.get(&format!("pipeline{depth}.rps")),
                ),
            );
        }
        push(
            format!("{mark}server → 8 clients, all replies in, p50"),
            &format!("multicast-{path}-8"),
            "p50_us",
            "µs",
            Better::Lower,
            c("≥ 1 C round trip", pp50),
        );
    }
    let bulk = limits.get("bulk.mib_s");
    for size in [1, 16, 128] {
        push(
            format!("{size} MiB transfer (object stream, 4 MiB pieces)"),
            &format!("large-aux-{size}MiB"),
            "mib_s",
            "MiB/s",
            Better::Higher,
            c("C TCP one stream", bulk),
        );
    }
    push(
        "128 MiB transfer (object stream, 1 MiB pieces)".to_owned(),
        "large-aux-128MiB-ck1024",
        "mib_s",
        "MiB/s",
        Better::Higher,
        c("C TCP one stream", bulk),
    );
    push(
        "[core] 128 MiB transfer (one request)".to_owned(),
        "large-core-128MiB",
        "mib_s",
        "MiB/s",
        Better::Higher,
        c("C TCP one stream", bulk),
    );
    let oneway = limits.get("oneway.msg_s");
    for path in ["aux", "core"] {
        let mark = if path == "core" { "[core] " } else { "" };
        push(
            format!("{mark}fire-and-forget ~100 B, received/s"),
            &format!("ff-{path}"),
            "e2e_rate",
            "msg/s",
            Better::Higher,
            c("C one-way writes", oneway),
        );
    }
    let big = "large-aux-128MiB";
    for (who, label) in [("site-1", "sender"), ("server", "receiver")] {
        rows.push(Row {
            scenario: format!("idle RSS of a cell process, {label}"),
            nv: nv.median(big, &format!("{who}_idle_rss_mib")),
            fr: fr.median(big, &format!("{who}_idle_rss_mib")),
            unit: "MiB",
            better: Better::Lower,
            c: None,
        });
    }
    for (who, label) in [("site-1", "sender"), ("server", "receiver")] {
        rows.push(Row {
            scenario: format!("peak RSS over idle during a 128 MiB transfer, {label}"),
            nv: nv.rss_growth(big, who),
            fr: fr.rss_growth(big, who),
            unit: "MiB",
            better: Better::Lower,
            c: None,
        });
    }

    let mut out = String::new();
    out.push_str("| scenario | NVFlare aux | fedrun | ratio | C limit | fedrun / C |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for r in &rows {
        out.push_str(&r.render());
        out.push('\n');
    }
    out.push_str(&targets(nv, fr, limits));
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// fedrun's performance targets, each as measured in this session.
fn targets(nv: &Results, fr: &Results, limits: &Limits) -> String {
    let mut out = String::from("\nTargets (same session):\n");
    let line = |out: &mut String, text: String| {
        let _ = writeln!(out, "- {text}");
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let na = || "n/a (missing figure)".to_owned();
    let rt_nv = ratio(
        nv.median("latency-aux", "p50_us"),
        fr.median("latency-aux", "p50_us"),
    );
    line(
        &mut out,
        rt_nv.map_or_else(na, |r| {
            format!(
                "round trip p50 ≥ 10× faster than NVFlare's aux path: {} → {}",
                times(r),
                verdict(r >= 10.0)
            )
        }),
    );
    let rt_c = ratio(
        fr.median("latency-aux", "p50_us"),
        limits.get("pingpong.p50_us"),
    );
    line(
        &mut out,
        rt_c.map_or_else(na, |r| {
            format!(
                "round trip p50 within 3× of C TCP ping-pong: {} C → {}",
                times(r),
                verdict(r <= 3.0)
            )
        }),
    );
    for depth in [16, 64] {
        let tag = format!("throughput-aux-c{depth}");
        let r = ratio(fr.median(&tag, "rps"), nv.median(&tag, "rps"));
        line(
            &mut out,
            r.map_or_else(na, |r| {
                format!(
                    "requests/s with {depth} in flight ≥ 50× NVFlare's aux path: {} → {}",
                    times(r),
                    verdict(r >= 50.0)
                )
            }),
        );
    }
    for size in [1, 16, 128] {
        let tag = format!("large-aux-{size}MiB");
        let r = ratio(fr.median(&tag, "mib_s"), limits.get("bulk.mib_s"));
        line(
            &mut out,
            r.map_or_else(na, |r| {
                format!(
                    "{size} MiB transfer ≥ 50 % of C single-stream bandwidth: {} % → {}",
                    num(100.0 * r, 0),
                    verdict(r >= 0.5)
                )
            }),
        );
    }
    for (who, label) in [("site-1", "sender"), ("server", "receiver")] {
        let g = fr.rss_growth("large-aux-128MiB", who);
        line(
            &mut out,
            g.map_or_else(na, |g| {
                format!(
                    "peak RSS over idle during a 128 MiB transfer < 32 MiB, {label}: {} MiB → {}",
                    num(g, 1),
                    verdict(g < 32.0)
                )
            }),
        );
    }
    let mut failed_ops = Vec::new();
    for (name, res) in [("NVFlare", nv), ("fedrun", fr)] {
        let mut tags: Vec<&String> = res.files.keys().collect();
        tags.sort();
        for tag in tags {
            let e = res.op_errors(tag);
            if e > 0 {
                failed_ops.push(format!("{name} {tag}: {e}"));
            }
        }
    }
    let rounds: Vec<String> = [("NVFlare", nv), ("fedrun", fr)]
        .iter()
        .map(|(name, r)| format!("{name} {} run(s)", r.runs("latency-aux")))
        .collect();
    let _ = writeln!(
        out,
        "\nMedians over the session's rounds ({}; C ping-pong {} run(s)). \
         Rows without `[core]` compare NVFlare's aux path (Cell on aux_communication, blob \
         streams) with fedrun's engine path (aux requests, aux fire-and-forget, object streaming); \
         `[core]` rows compare the core paths (NVFlare's CoreCell, fedrun's Cell): their NVFlare \
         column is NVFlare's core figure. C limits are unpinned unless noted.",
        rounds.join(", "),
        limits.count("pingpong.p50_us")
    );
    if failed_ops.is_empty() {
        out.push_str("Failed operations: none.\n");
    } else {
        let _ = writeln!(out, "Failed operations: {}.", failed_ops.join("; "));
    }
    out
}

/// The `table` role: reads the three inputs and prints the table.
///
/// # Errors
///
/// A results file that cannot be read or parsed; the limits file cannot be read.
pub fn run_table(opts: &TableOptions) -> Result<String, BenchError> {
    let nv = Results::load(&opts.nvflare_dir)?;
    let fr = Results::load(&opts.fedrun_dir)?;
    let text = std::fs::read_to_string(&opts.limits).map_err(|source| BenchError::File {
        path: opts.limits.clone(),
        source,
    })?;
    Ok(render(&nv, &fr, &Limits::parse(&text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(num(1234567.4, 0), "1,234,567");
        assert_eq!(num(999.0, 0), "999");
        assert_eq!(num(1000.25, 2), "1,000.25");
        assert_eq!(num(-1500.0, 0), "-1,500");
    }

    #[test]
    fn missing_figures_render_as_not_available() {
        let empty = Results::default();
        let text = render(&empty, &empty, &Limits::default());
        assert!(text.contains("| n/a | n/a | n/a |"));
        assert!(text.contains("n/a (missing figure)"));
    }
}
