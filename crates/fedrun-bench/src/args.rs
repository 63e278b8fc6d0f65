//! The command line of `fedrun-cellbench`, parsed by hand (a handful of `--key value` flags, the
//! same names as the NVFlare harness's `cellbench.py`, so one runbook drives both).
//!
//! The same [`Options`] travel from the orchestrator (`run`) to each child (`cell`): the
//! orchestrator turns them back into arguments with [`Options::child_args`].

use std::path::PathBuf;
use std::time::Duration;

use crate::error::BenchError;

/// The default piece size of a large aux transfer, in KiB: 4 MiB. Of 1, 2, 4 and 8 MiB pieces
/// of a 128 MiB object it was the fastest, with each side's peak RSS over idle far under 32 MiB
/// (about 5-9 MiB). The bench's wire settings ([`crate::node::wire_config`]) let such a piece
/// leave as one frame; one piece is in flight per stream, so fewer pieces per MiB means fewer
/// aux round trips.
pub const DEFAULT_CHUNK_KIB: usize = 4096;

/// A measured scenario (the names are `cellbench.py`'s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Sequential ~100 B request/reply, p50/p99.
    Latency,
    /// Requests/s with `concurrency` requests in flight.
    Throughput,
    /// Server → `clients` sites, time until every reply is in.
    Multicast,
    /// One large transfer, MiB/s and peak RSS.
    Large,
    /// ~100 B fire-and-forget messages received per second.
    Ff,
}

impl Scenario {
    /// Parses a scenario name.
    ///
    /// # Errors
    ///
    /// [`BenchError::Usage`] for an unknown name.
    pub fn parse(s: &str) -> Result<Scenario, BenchError> {
        Ok(match s {
            "latency" => Scenario::Latency,
            "throughput" => Scenario::Throughput,
            "multicast" => Scenario::Multicast,
            "large" => Scenario::Large,
            "ff" => Scenario::Ff,
            other => {
                return Err(BenchError::Usage(format!(
                    "unknown scenario {other:?} (latency, throughput, multicast, large, ff)"
                )))
            }
        })
    }

    /// The scenario's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Latency => "latency",
            Scenario::Throughput => "throughput",
            Scenario::Multicast => "multicast",
            Scenario::Large => "large",
            Scenario::Ff => "ff",
        }
    }

    /// Default (count, warm-up) of the scenario, as in `cellbench.py`.
    pub fn defaults(self) -> (usize, usize) {
        match self {
            Scenario::Latency => (2000, 200),
            Scenario::Throughput => (4000, 200),
            Scenario::Multicast => (300, 20),
            Scenario::Large => (5, 1),
            Scenario::Ff => (20000, 0),
        }
    }
}

/// Which fedrun path a scenario measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// Through the engine: aux requests (`EngineHandle::send_aux_request`, channel
    /// `aux_communication`), aux fire-and-forget, and object streaming for large transfers.
    Aux,
    /// Plain cells: `SendRequest`, `SendMultiRequest`, `FireAndForget`; one frame per message.
    Core,
}

impl PathKind {
    /// Parses `aux` or `core`.
    ///
    /// # Errors
    ///
    /// [`BenchError::Usage`] for anything else.
    pub fn parse(s: &str) -> Result<PathKind, BenchError> {
        match s {
            "aux" => Ok(PathKind::Aux),
            "core" => Ok(PathKind::Core),
            other => Err(BenchError::Usage(format!(
                "unknown path {other:?} (aux, core)"
            ))),
        }
    }

    /// The path's name.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Aux => "aux",
            PathKind::Core => "core",
        }
    }
}

/// Where the bytes of a large aux transfer come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A lazy reader producing one chunk at a time (like a model file read from disk): the
    /// object is never in memory as a whole.
    Reader,
    /// One in-memory buffer holding the whole object (what NVFlare's harness sends).
    Memory,
}

impl Source {
    /// Parses `reader` or `memory`.
    ///
    /// # Errors
    ///
    /// [`BenchError::Usage`] for anything else.
    pub fn parse(s: &str) -> Result<Source, BenchError> {
        match s {
            "reader" => Ok(Source::Reader),
            "memory" => Ok(Source::Memory),
            other => Err(BenchError::Usage(format!(
                "unknown source {other:?} (reader, memory)"
            ))),
        }
    }

    /// The source's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Reader => "reader",
            Source::Memory => "memory",
        }
    }
}

/// The options of a benchmark run (orchestrator) or of one cell process (child).
///
/// # Example
///
/// ```
/// use fedrun_bench::{Options, Scenario, PathKind};
///
/// let args = ["--scenario", "throughput", "--path", "core", "--concurrency", "64"];
/// let o = Options::parse(args.iter().map(|s| s.to_string())).unwrap();
/// assert_eq!((o.scenario, o.path, o.concurrency), (Scenario::Throughput, PathKind::Core, 64));
/// assert_eq!(o.count, 4000); // the scenario's default
/// assert_eq!(o.tag(), "throughput-core-c64");
/// ```
#[derive(Clone, Debug)]
pub struct Options {
    /// The scenario.
    pub scenario: Scenario,
    /// The path.
    pub path: PathKind,
    /// Fresh sets of processes, one per run (orchestrator).
    pub runs: usize,
    /// Add the runs to an existing results file of the same tag (orchestrator).
    pub append: bool,
    /// Measured operations per run.
    pub count: usize,
    /// Untimed operations before measuring.
    pub warmup: usize,
    /// Requests in flight (throughput).
    pub concurrency: usize,
    /// Sites (multicast).
    pub clients: usize,
    /// Transfer size in MiB (large).
    pub size_mib: f64,
    /// Where a large aux transfer's bytes come from.
    pub source: Source,
    /// The chunk size of a large aux transfer (`BytesProducer`), in KiB
    /// ([`DEFAULT_CHUNK_KIB`] unless `--chunk-kib` says otherwise).
    pub chunk_kib: usize,
    /// Wall-clock bound of one run.
    pub deadline: Duration,
    /// Where `<tag>.json` files are written (orchestrator).
    pub results_dir: PathBuf,
    /// The cell's name: `server` or `site-<i>` (child).
    pub name: String,
    /// The server's port; 0 lets the server pick one and report it (child).
    pub port: u16,
    /// This child measures (child).
    pub active: bool,
    /// A child exits by itself after this long, whatever happens (child).
    pub max_life: Duration,
}

fn number<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T, BenchError> {
    let value = value.ok_or_else(|| BenchError::Usage(format!("{flag} needs a value")))?;
    value
        .parse()
        .map_err(|_| BenchError::Usage(format!("{flag}: {value:?} is not a valid number")))
}

fn text(flag: &str, value: Option<String>) -> Result<String, BenchError> {
    value.ok_or_else(|| BenchError::Usage(format!("{flag} needs a value")))
}

fn seconds(flag: &str, value: Option<String>) -> Result<Duration, BenchError> {
    let secs: f64 = number(flag, value)?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| BenchError::Usage(format!("{flag}: {secs} is not a valid duration")))
}

impl Options {
    /// Parses the flags that follow the role (`run` or `cell`).
    ///
    /// # Errors
    ///
    /// [`BenchError::Usage`] for a missing `--scenario`, an unknown flag or a malformed value.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, BenchError> {
        let mut scenario = None;
        let mut path = PathKind::Aux;
        let mut runs = 3;
        let mut append = false;
        let mut count = None;
        let mut warmup = None;
        let mut concurrency = 16;
        let mut clients = 8;
        let mut size_mib = 1.0;
        let mut source = Source::Reader;
        let mut chunk_kib = DEFAULT_CHUNK_KIB;
        let mut deadline = Duration::from_secs(240);
        let mut results_dir = PathBuf::from("results");
        let mut name = String::new();
        let mut port = 0;
        let mut active = false;
        let mut max_life = Duration::from_secs(600);
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            match flag.as_str() {
                "--scenario" => scenario = Some(Scenario::parse(&text(&flag, it.next())?)?),
                "--path" => path = PathKind::parse(&text(&flag, it.next())?)?,
                "--runs" => runs = number(&flag, it.next())?,
                "--append" => append = true,
                "--count" => count = Some(number(&flag, it.next())?),
                "--warmup" => warmup = Some(number(&flag, it.next())?),
                "--concurrency" => concurrency = number(&flag, it.next())?,
                "--clients" => clients = number(&flag, it.next())?,
                "--size-mib" => size_mib = number(&flag, it.next())?,
                "--source" => source = Source::parse(&text(&flag, it.next())?)?,
                "--chunk-kib" => chunk_kib = number(&flag, it.next())?,
                "--deadline" => deadline = seconds(&flag, it.next())?,
                "--results-dir" => results_dir = PathBuf::from(text(&flag, it.next())?),
                "--name" => name = text(&flag, it.next())?,
                "--port" => port = number(&flag, it.next())?,
                "--active" => active = true,
                "--max-life" => max_life = seconds(&flag, it.next())?,
                other => return Err(BenchError::Usage(format!("unknown flag {other:?}"))),
            }
        }
        let scenario =
            scenario.ok_or_else(|| BenchError::Usage("--scenario is required".into()))?;
        if !(size_mib > 0.0 && size_mib <= 4096.0) {
            return Err(BenchError::Usage(format!(
                "--size-mib {size_mib}: must be in (0, 4096]"
            )));
        }
        if concurrency == 0 || clients == 0 || chunk_kib == 0 {
            return Err(BenchError::Usage(
                "--concurrency, --clients and --chunk-kib must be at least 1".into(),
            ));
        }
        let (default_count, default_warmup) = scenario.defaults();
        Ok(Options {
            scenario,
            path,
            runs,
            append,
            count: count.unwrap_or(default_count),
            warmup: warmup.unwrap_or(default_warmup),
            concurrency,
            clients,
            size_mib,
            source,
            chunk_kib,
            deadline,
            results_dir,
            name,
            port,
            active,
            max_life,
        })
    }

    /// The transfer size in bytes.
    pub fn size_bytes(&self) -> u64 {
        (self.size_mib * 1024.0 * 1024.0).round() as u64
    }

    /// The number of site processes a run starts.
    pub fn sites(&self) -> usize {
        if self.scenario == Scenario::Multicast {
            self.clients
        } else {
            1
        }
    }

    /// The results tag, as `cellbench.py` names its files (`latency-aux`,
    /// `throughput-core-c64`, `large-aux-128MiB`, `multicast-aux-8`).
    pub fn tag(&self) -> String {
        let mut tag = format!("{}-{}", self.scenario.as_str(), self.path.as_str());
        match self.scenario {
            Scenario::Throughput => tag.push_str(&format!("-c{}", self.concurrency)),
            Scenario::Large => {
                tag.push_str(&format!("-{}MiB", fmt_g(self.size_mib)));
                if self.chunk_kib != DEFAULT_CHUNK_KIB {
                    tag.push_str(&format!("-ck{}", self.chunk_kib));
                }
            }
            Scenario::Multicast => tag.push_str(&format!("-{}", self.clients)),
            Scenario::Latency | Scenario::Ff => {}
        }
        tag
    }

    /// The arguments of one child process: `cell` plus every option, and its own name, port and
    /// role.
    pub fn child_args(&self, name: &str, port: u16, active: bool, clients: usize) -> Vec<String> {
        let mut a: Vec<String> = [
            "cell",
            "--scenario",
            self.scenario.as_str(),
            "--path",
            self.path.as_str(),
            "--source",
            self.source.as_str(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let pairs = [
            ("--count", self.count.to_string()),
            ("--warmup", self.warmup.to_string()),
            ("--concurrency", self.concurrency.to_string()),
            ("--clients", clients.to_string()),
            ("--size-mib", self.size_mib.to_string()),
            ("--chunk-kib", self.chunk_kib.to_string()),
            ("--deadline", self.deadline.as_secs_f64().to_string()),
            (
                "--max-life",
                (self.deadline + Duration::from_secs(120))
                    .as_secs_f64()
                    .to_string(),
            ),
            ("--name", name.to_owned()),
            ("--port", port.to_string()),
        ];
        for (k, v) in pairs {
            a.push(k.to_owned());
            a.push(v);
        }
        if active {
            a.push("--active".to_owned());
        }
        a
    }
}

/// Formats like Python's `{:g}` for the sizes used here (`1`, `16`, `0.5`).
fn fmt_g(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x}")
    }
}

/// The options of the `table` command: where the results of both implementations and the C
/// limits are.
#[derive(Clone, Debug)]
pub struct TableOptions {
    /// NVFlare's `results/` folder (written by `cellbench.py`).
    pub nvflare_dir: PathBuf,
    /// fedrun's results folder (written by `fedrun-cellbench run`).
    pub fedrun_dir: PathBuf,
    /// The C limits, one JSON object per line (the output of `netlimits`).
    pub limits: PathBuf,
}

impl TableOptions {
    /// Parses `--nvflare DIR --fedrun DIR --limits FILE`.
    ///
    /// # Errors
    ///
    /// [`BenchError::Usage`] for a missing or unknown flag.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<TableOptions, BenchError> {
        let (mut nvflare, mut fedrun, mut limits) = (None, None, None);
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let value = Some(PathBuf::from(text(&flag, it.next())?));
            match flag.as_str() {
                "--nvflare" => nvflare = value,
                "--fedrun" => fedrun = value,
                "--limits" => limits = value,
                other => return Err(BenchError::Usage(format!("unknown flag {other:?}"))),
            }
        }
        let need = |v: Option<PathBuf>, flag: &str| {
            v.ok_or_else(|| BenchError::Usage(format!("{flag} is required")))
        };
        Ok(TableOptions {
            nvflare_dir: need(nvflare, "--nvflare")?,
            fedrun_dir: need(fedrun, "--fedrun")?,
            limits: need(limits, "--limits")?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, BenchError> {
        Options::parse(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn child_args_parse_back_to_the_same_options() {
        let o = parse(&["--scenario", "large", "--size-mib", "16", "--count", "3"]).unwrap();
        let child = o.child_args("site-1", 4242, true, 1);
        assert_eq!(child[0], "cell");
        let back = Options::parse(child.into_iter().skip(1)).unwrap();
        assert_eq!(back.scenario, Scenario::Large);
        assert_eq!(back.size_bytes(), 16 << 20);
        assert_eq!((back.count, back.port, back.active), (3, 4242, true));
        assert_eq!(back.name, "site-1");
        assert_eq!(back.tag(), "large-aux-16MiB");
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        assert!(matches!(parse(&[]), Err(BenchError::Usage(_))));
        assert!(matches!(
            parse(&["--scenario", "nope"]),
            Err(BenchError::Usage(_))
        ));
        assert!(matches!(
            parse(&["--scenario", "ff", "--count", "x"]),
            Err(BenchError::Usage(_))
        ));
        assert!(matches!(
            parse(&["--scenario", "ff", "--bogus"]),
            Err(BenchError::Usage(_))
        ));
        assert!(matches!(
            parse(&["--scenario", "large", "--size-mib", "0"]),
            Err(BenchError::Usage(_))
        ));
    }
}
