//! NVFlare's hello-numpy ScatterAndGather job (`examples/hello-numpy`), unchanged, through
//! `fedrun simulate`: NVFlare's `NPModelPersistor` starts from `[[1,2,3],[4,5,6],[7,8,9]]`
//! (float32), each of 2 clients' `NPTrainer` adds 1 per round, FedAvg averages, so after 2
//! rounds the global model is `[[3,4,5],[6,7,8],[9,10,11]]`. Every wait has a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedrun_cli::{simulate, NoObserver, SimulateOptions};
use fedrun_core::NdArray;

/// The deadline of one whole run.
const RUN_DEADLINE: Duration = Duration::from_secs(60);

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello-numpy")
}

fn temp_workspace(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fedrun-hello-numpy-{tag}-{}", uuid::Uuid::new_v4()))
}

fn expected_final_model() -> Vec<f32> {
    (3u8..=11).map(f32::from).collect()
}

fn read_npy(path: &Path) -> NdArray {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    NdArray::from_npy(bytes.into()).unwrap()
}

#[test]
fn two_clients_two_rounds_end_at_nvflares_expected_model() {
    let ws = temp_workspace("lib");
    let options = SimulateOptions {
        clients: 2,
        job: Some(example()),
        workspace: Some(ws.clone()),
        ..SimulateOptions::default()
    };
    let report = actix::System::new()
        .block_on(async {
            tokio::time::timeout(RUN_DEADLINE, simulate(options, &mut NoObserver)).await
        })
        .expect("the run ended before its deadline")
        .unwrap();
    assert_eq!(report.round_metrics.len(), 2);
    let model = report.model.as_ref().unwrap();
    assert_eq!(model.len(), 1, "the model is the one array numpy_key");
    let global = &model["numpy_key"];
    assert_eq!(global.descr(), "<f4");
    assert_eq!(global.shape(), &[3, 3]);
    assert_eq!(global.to_f32_vec().unwrap(), expected_final_model());

    // NVFlare's files: the server model at models/server.npy, each site's local model at
    // <run dir>/model/best_numpy.npy
    assert_eq!(&read_npy(&ws.join("models/server.npy")), global);
    for site in ["site-1", "site-2"] {
        let local = read_npy(&ws.join(site).join("model/best_numpy.npy"));
        assert_eq!(
            local.to_f32_vec().unwrap(),
            expected_final_model(),
            "{site}"
        );
    }
    std::fs::remove_dir_all(&ws).unwrap();
}

#[actix::test]
async fn the_fedrun_binary_runs_the_example_directory_unchanged() {
    let ws = temp_workspace("bin");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fedrun"));
    command
        .arg("simulate")
        .arg("--job")
        .arg(example())
        .args(["--clients", "2", "--workspace"])
        .arg(&ws)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(RUN_DEADLINE, command.output())
        .await
        .expect("fedrun simulate ended before its deadline")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("completed"), "{stdout}");
    let server = read_npy(&ws.join("models/server.npy"));
    assert_eq!(server.descr(), "<f4");
    assert_eq!(server.shape(), &[3, 3]);
    assert_eq!(server.to_f32_vec().unwrap(), expected_final_model());
    std::fs::remove_dir_all(&ws).unwrap();
}
