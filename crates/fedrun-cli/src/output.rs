//! What a simulation leaves behind: the per-round table on the terminal, and `metrics.json`,
//! `model.json` and the model's `.npy` files in the workspace.
//!
//! Kept apart from the simulation so the files' format is defined in one place and tests can
//! read what the CLI writes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use fedrun_core::NdArray;
use fedrun_server::persistor::npy_file_name;
use serde_json::{json, Value as Json};

use crate::error::CliError;

/// The name of the metrics file in the workspace.
pub const METRICS_FILE: &str = "metrics.json";
/// The name of the model description file in the workspace.
pub const MODEL_FILE: &str = "model.json";
/// Arrays with at most this many elements have their values written into `model.json` too.
pub const MAX_INLINE_VALUES: usize = 4096;

/// One round as the simulator reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundRecord {
    /// The round number (from 0).
    pub round: u32,
    /// How many clients' results were aggregated.
    pub clients: usize,
    /// The global model's loss that round (weighted mean of the clients' `loss`), if reported.
    pub loss: Option<f64>,
    /// The global model's accuracy that round (weighted mean of the clients' `accuracy`), if
    /// reported.
    pub accuracy: Option<f64>,
    /// Wall-clock duration of the round, in seconds.
    pub seconds: f64,
}

impl RoundRecord {
    /// The record as JSON (`null` for metrics not reported).
    pub fn to_json(&self) -> Json {
        json!({
            "round": self.round,
            "clients": self.clients,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "seconds": self.seconds,
        })
    }
}

/// The per-round table printed at the end of a run.
///
/// # Example
/// ```
/// use fedrun_cli::output::{format_table, RoundRecord};
///
/// let t = format_table(&[RoundRecord {
///     round: 0, clients: 4, loss: Some(0.6931), accuracy: Some(0.5), seconds: 0.012,
/// }]);
/// assert!(t.lines().next().unwrap().starts_with("round"));
/// assert!(t.contains("0.6931"));
/// ```
pub fn format_table(rounds: &[RoundRecord]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5}  {:>7}  {:>8}  {:>8}  {:>8}",
        "round", "clients", "loss", "accuracy", "seconds"
    );
    let metric = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"));
    for r in rounds {
        let _ = writeln!(
            out,
            "{:>5}  {:>7}  {:>8}  {:>8}  {:>8.3}",
            r.round,
            r.clients,
            metric(r.loss),
            metric(r.accuracy),
            r.seconds
        );
    }
    out
}

/// Writes `metrics.json` into `workspace`: `{job_id, job_name, clients, num_rounds, outcome,
/// rounds: [...]}`. Returns the file's path.
pub fn write_metrics(
    workspace: &Path,
    summary: &Json,
    rounds: &[RoundRecord],
) -> Result<PathBuf, CliError> {
    let mut doc = summary.clone();
    if let Some(obj) = doc.as_object_mut() {
        obj.insert(
            "rounds".to_owned(),
            Json::Array(rounds.iter().map(RoundRecord::to_json).collect()),
        );
    }
    write_json(&workspace.join(METRICS_FILE), &doc)
}

/// Writes the final model: one `.npy` per array into `model_dir`, named as the server's `.npy`
/// persistor names them (unless the file is already there, written by the persistor) and `model.json` into `workspace`, describing
/// each array (dtype, shape, file, and its values when small). Returns `model.json`'s path.
pub fn write_model(
    workspace: &Path,
    model_dir: &Path,
    summary: &Json,
    arrays: &[(String, NdArray)],
) -> Result<PathBuf, CliError> {
    std::fs::create_dir_all(model_dir)
        .map_err(|e| CliError::io("cannot create directory", model_dir, e))?;
    let mut described = Vec::with_capacity(arrays.len());
    for (name, array) in arrays {
        let file = model_dir.join(npy_file_name(name));
        if !file.exists() {
            std::fs::write(&file, array.npy())
                .map_err(|e| CliError::io("cannot write", &file, e))?;
        }
        let mut entry = json!({
            "name": name,
            "dtype": array.dtype().name(),
            "shape": array.shape(),
            "file": file.strip_prefix(workspace).unwrap_or(&file),
        });
        if array.len() <= MAX_INLINE_VALUES {
            if let Ok(values) = array.to_f64_vec().or_else(|_| {
                array
                    .to_f32_vec()
                    .map(|v| v.into_iter().map(f64::from).collect())
            }) {
                entry["values"] = json!(values);
            }
        }
        described.push(entry);
    }
    let mut doc = summary.clone();
    if let Some(obj) = doc.as_object_mut() {
        obj.insert("arrays".to_owned(), Json::Array(described));
    }
    write_json(&workspace.join(MODEL_FILE), &doc)
}

fn write_json(path: &Path, doc: &Json) -> Result<PathBuf, CliError> {
    let text = serde_json::to_string_pretty(doc).map_err(|source| CliError::Json {
        path: path.to_owned(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(|e| CliError::io("cannot write", path, e))?;
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn model_json_describes_each_array_and_the_npy_reads_back() {
        let ws = std::env::temp_dir().join(format!("fedrun-out-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&ws).unwrap();
        let w = NdArray::from_f32(&[3], &[1.0, 2.0, 3.0]).unwrap();
        let path = write_model(
            &ws,
            &ws.join("model"),
            &json!({"job_id": "j"}),
            &[("w".into(), w.clone())],
        )
        .unwrap();
        let doc: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(doc["arrays"][0]["shape"], json!([3]));
        assert_eq!(doc["arrays"][0]["values"], json!([1.0, 2.0, 3.0]));
        assert_eq!(doc["arrays"][0]["file"], json!("model/w.npy"));
        let npy = std::fs::read(ws.join("model/w.npy")).unwrap();
        let back = NdArray::from_npy(npy.into()).unwrap();
        assert_eq!(back.to_f32_vec().unwrap(), vec![1.0, 2.0, 3.0]);
        std::fs::remove_dir_all(&ws).unwrap();
    }

    #[test]
    fn metrics_json_lists_every_round_with_null_for_missing_metrics() {
        let ws = std::env::temp_dir().join(format!("fedrun-out-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&ws).unwrap();
        let rounds = [RoundRecord {
            round: 0,
            clients: 2,
            loss: None,
            accuracy: Some(0.75),
            seconds: 0.5,
        }];
        let path = write_metrics(&ws, &json!({"outcome": "completed"}), &rounds).unwrap();
        let doc: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(doc["outcome"], json!("completed"));
        assert_eq!(doc["rounds"][0]["loss"], Json::Null);
        assert_eq!(doc["rounds"][0]["accuracy"], json!(0.75));
        std::fs::remove_dir_all(&ws).unwrap();
    }
}
