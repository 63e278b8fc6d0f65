//! Loading a job as NVFlare's client parent deploys it (`<ws>/<job_id>/app_<site>/config/...`),
//! on temporary workspaces: JSON and HOCON configs and NVFlare's search order, missing files,
//! classes fedrun lacks, injected components, variable substitution, the meta and
//! `np_download_chunk_size`, and building the result on an engine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use fedrun_cli::deployed::{DeployOptions, DeployedJob};
use fedrun_cli::CliError;
use serde_json::json;

const JOB: &str = "job-7";
const SITE: &str = "site-1";

struct Ws(PathBuf);

impl Ws {
    fn new() -> Self {
        Ws(std::env::temp_dir().join(format!("fedrun-deployed-{}", uuid::Uuid::new_v4())))
    }

    fn config_dir(&self) -> PathBuf {
        self.0.join(JOB).join(format!("app_{SITE}")).join("config")
    }

    fn write(&self, relative: &str, text: &str) -> PathBuf {
        let path = self.config_dir().join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn load(&self) -> Result<DeployedJob, CliError> {
        DeployedJob::load(&self.0, JOB, SITE)
    }
}

impl Drop for Ws {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn np_json(delta: i64) -> String {
    json!({
        "format_version": 2,
        "executors": [{"tasks": ["train", "submit_model"], "executor": {
            "id": "trainer", "path": "nvflare.app_common.np.np_trainer.NPTrainer",
            "args": {"delta": delta}}}],
        "components": [],
        "task_data_filters": [],
        "task_result_filters": []
    })
    .to_string()
}

const NP_CONF: &str = r#"
{
  # NVFlare template style
  format_version = 2
  model_subdir = "m"
  executors = [
    {
      tasks = ["validate"]
      executor {
        id = "validator"
        name = "NPValidator"
        args.sleep_time = 0
      }
    }
  ]
  components = []
}
"#;

#[test]
fn a_json_config_is_read_and_json_wins_over_conf() {
    let ws = Ws::new();
    ws.write("config_fed_client.conf", NP_CONF);
    let json_path = ws.write("config_fed_client.json", &np_json(3));
    let job = ws.load().unwrap();
    assert_eq!(job.config_path, json_path);
    assert_eq!(
        job.client_config.executors[0].tasks,
        ["train", "submit_model"]
    );
    assert_eq!(job.run_dir, ws.0.join(JOB));
    assert_eq!(job.app_dir, ws.0.join(JOB).join("app_site-1"));
    assert_eq!(job.np_download_chunk_size, None);
    assert!(job.ignored_components.is_empty());
}

#[test]
fn a_hocon_config_is_read_when_there_is_no_json() {
    let ws = Ws::new();
    let path = ws.write("config_fed_client.conf", NP_CONF);
    let job = ws.load().unwrap();
    assert_eq!(job.config_path, path);
    assert_eq!(job.client_config.executors[0].tasks, ["validate"]);
    assert_eq!(
        job.config["executors"][0]["executor"]["args"],
        json!({"sleep_time": 0})
    );
    // the search also looks into subdirectories, as NVFlare's does
    let ws2 = Ws::new();
    let nested = ws2.write("sub/config_fed_client.json", &np_json(1));
    assert_eq!(ws2.load().unwrap().config_path, nested);
}

#[test]
fn missing_and_unsupported_configs_are_bad_jobs_naming_the_place() {
    let ws = Ws::new();
    std::fs::create_dir_all(ws.config_dir()).unwrap();
    let err = ws.load().unwrap_err().to_string();
    assert!(err.contains("config_fed_client[.json|.conf"), "{err}");
    assert!(err.contains("app_site-1"), "{err}");
    ws.write("config_fed_client.yml", "a: 1");
    let err = ws.load().unwrap_err().to_string();
    assert!(err.contains("YAML"), "{err}");
    let other_site = DeployedJob::load(&ws.0, JOB, "site-2").unwrap_err();
    assert!(
        other_site.to_string().contains("app_site-2"),
        "{other_site}"
    );
    let bad = Ws::new();
    bad.write("config_fed_client.conf", "a = [1,");
    let err = bad.load().unwrap_err().to_string();
    assert!(
        err.contains("config_fed_client.conf") && err.contains("line"),
        "{err}"
    );
}

#[test]
fn a_class_without_a_fedrun_factory_fails_once_naming_class_and_id() {
    let ws = Ws::new();
    let config = json!({
        "format_version": 2,
        "executors": [{"tasks": ["train"], "executor": {
            "path": "nvflare.app_common.np.np_trainer.NPTrainer"}}],
        "components": [
            {"id": "off", "path": "my.Disabled", "disabled": true},
            {"id": "tracker", "path": "nvflare.app_opt.tracking.tb.tb_writer.TBWriter"},
            {"id": "second", "path": "other.Missing"}
        ]
    });
    ws.write("config_fed_client.json", &config.to_string());
    let err = ws.load().unwrap_err().to_string();
    assert!(
        err.contains("component 'tracker'")
            && err.contains("nvflare.app_opt.tracking.tb.tb_writer.TBWriter"),
        "{err}"
    );
    assert!(!err.contains("other.Missing"), "one message: {err}");
    // an executor's class is checked too
    let exec = json!({"format_version": 2, "executors": [{"tasks": ["train"], "executor": {
        "id": "x", "path": "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor"}}]});
    ws.write("config_fed_client.json", &exec.to_string());
    let err = ws.load().unwrap_err().to_string();
    assert!(
        err.contains("executor 'x'") && err.contains("ClientAPIExecutor"),
        "{err}"
    );
    // known classes can be widened by the caller
    let options = DeployOptions {
        known_classes: vec![
            "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor".into(),
        ],
        ..DeployOptions::default()
    };
    assert!(DeployedJob::load_with(&ws.0, JOB, SITE, &options).is_ok());
}

#[test]
fn the_client_parents_job_log_streamer_is_ignored() {
    let ws = Ws::new();
    let mut config: serde_json::Value = serde_json::from_str(&np_json(1)).unwrap();
    config["components"] = json!([{
        "id": "auto_log_streamer",
        "path": "nvflare.app_common.logging.job_log_streamer.JobLogStreamer",
        "args": {"target_parent_server": true}
    }]);
    ws.write("config_fed_client.json", &config.to_string());
    let job = ws.load().unwrap();
    assert_eq!(job.ignored_components.len(), 1);
    assert_eq!(job.ignored_components[0].id, "auto_log_streamer");
    assert!(job.client_config.components.is_empty());
    assert_eq!(job.config["components"], json!([]));
}

#[test]
fn variables_are_substituted_with_system_variables_and_inside_strings() {
    let ws = Ws::new();
    let config = json!({
        "format_version": 2,
        "delta": 5,
        "name_part": "best",
        "executors": [{"tasks": ["train"], "executor": {
            "path": "nvflare.app_common.np.np_trainer.NPTrainer",
            "args": {"delta": "{delta}", "model_name": "{name_part}_{SITE_NAME}.npy",
                     "model_dir": "{JOB_ID}"}}}],
        "components": []
    });
    ws.write("config_fed_client.json", &config.to_string());
    let job = ws.load().unwrap();
    let args = &job.config["executors"][0]["executor"]["args"];
    assert_eq!(args["delta"], json!(5));
    assert_eq!(args["model_name"], json!("best_site-1.npy"));
    assert_eq!(args["model_dir"], json!(JOB));
}

#[test]
fn meta_fields_and_np_download_chunk_size_are_exposed() {
    let ws = Ws::new();
    let mut config: serde_json::Value = serde_json::from_str(&np_json(1)).unwrap();
    config["np_download_chunk_size"] = json!(1048576);
    ws.write("config_fed_client.json", &config.to_string());
    let meta = json!({
        "name": "hello-numpy", "launcher_spec": {"default": {"x": 1}},
        "job_clients": [{"name": "site-1", "fqsn": "site-1"}, "site-2"]
    });
    std::fs::write(ws.0.join(JOB).join("meta.json"), meta.to_string()).unwrap();
    let job = ws.load().unwrap();
    assert_eq!(job.name.as_deref(), Some("hello-numpy"));
    assert_eq!(job.launcher_spec, Some(json!({"default": {"x": 1}})));
    assert_eq!(job.job_client_names().unwrap(), ["site-1", "site-2"]);
    assert_eq!(job.np_download_chunk_size, Some(1_048_576));
    // --set wins over the config
    let options = DeployOptions {
        set: vec!["np_download_chunk_size=4096".into()],
        ..DeployOptions::default()
    };
    let job = DeployedJob::load_with(&ws.0, JOB, SITE, &options).unwrap();
    assert_eq!(job.np_download_chunk_size, Some(4096));
    let bad = DeployOptions {
        set: vec!["np_download_chunk_size=big".into()],
        ..DeployOptions::default()
    };
    let err = DeployedJob::load_with(&ws.0, JOB, SITE, &bad).unwrap_err();
    assert!(err.to_string().contains("np_download_chunk_size"), "{err}");
    std::fs::write(ws.0.join(JOB).join("meta.json"), "[1]").unwrap();
    assert!(ws.load().unwrap_err().to_string().contains("meta.json"));
}

#[actix::test]
async fn a_loaded_job_builds_its_executors_on_an_engine() {
    let ws = Ws::new();
    ws.write("config_fed_client.json", &np_json(2));
    let job = ws.load().unwrap();
    let network = fedrun_cell::Network::new();
    let engine = fedrun_engine::ClientEngine::builder(SITE, JOB)
        .start(&network)
        .await
        .unwrap();
    let router = job.build(&engine).await.unwrap();
    assert!(router.route("train").is_some());
    assert!(router.route("submit_model").is_some());
    assert!(router.route("validate").is_none());
    assert!(engine.get_component("trainer").await.unwrap().is_some());
    engine.stop().await;
}
