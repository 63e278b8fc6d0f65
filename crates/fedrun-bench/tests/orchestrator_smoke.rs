//! A cheap end-to-end check of the orchestrator: one latency run over loopback TCP with a server
//! and a site process, both started by `fedrun-cellbench run`, and its results file.

#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn orchestrator_runs_a_server_and_a_site_process_and_writes_the_results_file() {
    let dir = std::env::temp_dir().join(format!("fedrun-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for path in ["core", "aux"] {
        let out = Command::new(env!("CARGO_BIN_EXE_fedrun-cellbench"))
            .args([
                "run",
                "--scenario",
                "latency",
                "--path",
                path,
                "--runs",
                "1",
            ])
            .args(["--count", "50", "--warmup", "5", "--deadline", "30"])
            .arg("--results-dir")
            .arg(&dir)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("SUMMARY "), "{stdout}");

        let file = dir.join(format!("latency-{path}.json"));
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(results["errors"], 0, "{results}");
        let run = &results["runs"][0];
        assert_eq!(run["n"], 50, "{run}");
        assert_eq!(run["errors"], 0, "{run}");
        assert!(run["p50_us"].as_f64().unwrap() > 0.0);
        // both children were measured before they were stopped
        for who in ["server", "site-1"] {
            assert!(run["rss"][who]["hwm"].as_u64().unwrap() > 0, "{run}");
            assert!(run["rss"][who]["ready_rss"].as_u64().unwrap() > 0, "{run}");
        }
        assert!(results["summary"]["p50_us"]["median"].as_f64().is_some());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
