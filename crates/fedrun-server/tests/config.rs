//! Server jobs built from NVFlare's `config_fed_server.json` (format version 2).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use fedrun_cell::Network;
use fedrun_core::{NdArray, Value};
use fedrun_engine::factory;
use fedrun_server::{
    save_npy_model, FedAvg, ModelWeights, ServerError, ServerFactories, ServerJob, ServerJobConfig,
    SharedAggregator,
};

use common::{task_id, task_name, temp_dir, weights_result, within, FakeClient, POLL};

const JOB: &str = "job-c";

fn config_text(persistor_args: &str, extra_components: &str) -> String {
    format!(
        r#"{{
  "format_version": 2,
  "workflows": [
    {{
      "id": "scatter_and_gather",
      "path": "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather",
      "args": {{
        "min_clients": 2,
        "num_rounds": 1,
        "start_round": 0,
        "wait_time_after_min_received": 0,
        "aggregator_id": "aggregator",
        "persistor_id": "persistor",
        "shareable_generator_id": "shareable_generator",
        "train_task_name": "train",
        "train_timeout": 0
      }}
    }}
  ],
  "components": [
    {{"id": "persistor", "path": "fedrun.persistors.NpyModelPersistor", "args": {persistor_args}}},
    {{"id": "shareable_generator",
      "path": "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator",
      "args": {{}}}},
    {{"id": "aggregator",
      "path": "nvflare.app_common.aggregators.intime_accumulate_model_aggregator.InTimeAccumulateWeightedAggregator",
      "args": {{"expected_data_kind": "WEIGHTS"}}}}
    {extra_components}
  ]
}}"#
    )
}

#[actix::test]
async fn a_config_built_scatter_and_gather_runs_and_saves_its_model() {
    let base = temp_dir("config");
    let mut initial = ModelWeights::new();
    initial.insert("w".into(), NdArray::from_f32(&[2], &[1.0, 1.0]).unwrap());
    save_npy_model(&base.join("init"), &initial).unwrap();
    let text = config_text(r#"{"dir": "out", "initial_model": "init"}"#, "");
    let config = ServerJobConfig::from_json(&text).unwrap();
    assert_eq!(config.format_version, Some(2));
    let mut built = within(config.build(&ServerFactories::new(&base)))
        .await
        .unwrap();
    assert_eq!(built.workflows.len(), 1);
    assert_eq!(built.workflows[0].name(), "scatter_and_gather");
    let ids: Vec<&str> = built.components.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["persistor", "shareable_generator", "aggregator"]);

    let network = Network::new();
    let server = within(
        ServerJob::builder(JOB)
            .job_clients(&["site-1", "site-2"])
            .poll_interval(POLL)
            .start(&network),
    )
    .await
    .unwrap();
    let mut clients = Vec::new();
    for (site, value, steps) in [("site-1", 2.0f32, 1), ("site-2", 5.0, 2)] {
        let client = FakeClient::start(&network, site, JOB).await;
        clients.push(tokio::task::spawn_local(async move {
            let task = client.next_task(None).await;
            assert_eq!(common::dxo_array(&task, "w"), vec![1.0, 1.0]);
            assert_eq!(
                task.cookie("__workflow__"),
                Some(&Value::from("scatter_and_gather"))
            );
            let result = weights_result(&[("w", &[2], &[value, value])], steps, &[]);
            client.submit(&task, result).await;
            let end = client.next_task(Some(&task_id(&task))).await;
            assert_eq!(task_name(&end), "__end_run__");
        }));
    }
    let outcomes = within(server.run_workflows(&mut built.workflows))
        .await
        .unwrap();
    for c in clients {
        within(c).await.unwrap();
    }
    // (2*1 + 5*2) / 3 = 4
    let model = outcomes[0].model.as_ref().unwrap();
    assert_eq!(model["w"].to_f32_vec().unwrap(), vec![4.0, 4.0]);
    let saved = fedrun_server::load_npy_model(&base.join("out")).unwrap();
    assert_eq!(&saved, model);
    server.stop().await;
    std::fs::remove_dir_all(&base).unwrap();
}

#[actix::test]
async fn unknown_classes_fail_the_build_unless_skipped() {
    let extra = r#", {"id": "json_generator", "path": "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator", "args": {}}"#;
    let config = ServerJobConfig::from_json(&config_text(r#"{"dir": "out"}"#, extra)).unwrap();
    let err = within(config.build(&ServerFactories::new(temp_dir("unknown"))))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ServerError::Component { id, .. } if id == "json_generator"),
        "{err}"
    );
    assert!(err.to_string().contains("ValidationJsonGenerator"), "{err}");
    let built = within(config.build(&ServerFactories::new(temp_dir("unknown")).skip_unknown(true)))
        .await
        .unwrap();
    assert_eq!(built.components.len(), 3);
    assert_eq!(built.workflows.len(), 1);
}

#[actix::test]
async fn workflow_args_that_name_missing_or_wrong_components_are_clear_errors() {
    let text = config_text(r#"{"dir": "out"}"#, "").replace(
        r#""persistor_id": "persistor""#,
        r#""persistor_id": "aggregator""#,
    );
    let config = ServerJobConfig::from_json(&text).unwrap();
    let err = within(config.build(&ServerFactories::default()))
        .await
        .unwrap_err();
    match &err {
        ServerError::WorkflowBuild { id, reason, .. } => {
            assert_eq!(id, "scatter_and_gather");
            assert!(reason.contains("component \"aggregator\" is a"), "{reason}");
        }
        other => panic!("{other}"),
    }
}

#[actix::test]
async fn user_factories_override_and_extend_the_builtins() {
    let text = config_text(r#"{"dir": "out"}"#, "").replace(
        "nvflare.app_common.aggregators.intime_accumulate_model_aggregator.InTimeAccumulateWeightedAggregator",
        "my.aggregators.Mean",
    );
    let config = ServerJobConfig::from_json(&text).unwrap();
    let mut factories = ServerFactories::default();
    assert!(matches!(
        within(config.build(&factories)).await,
        Err(ServerError::Component { .. })
    ));
    factories.register_component(
        "my.aggregators.Mean",
        factory(|_args| Ok(SharedAggregator(Arc::new(FedAvg::default())))),
    );
    let built = within(config.build(&factories)).await.unwrap();
    let (_, agg) = &built.components[2];
    assert!(agg.downcast::<SharedAggregator>().is_some());
}

#[test]
fn malformed_configs_are_refused_with_a_reason() {
    let cases = [
        ("[]", "must be an object"),
        (r#"{"format_version": 1}"#, "format_version 1"),
        (
            r#"{"format_version": 2, "workflows": {}}"#,
            "'workflows' must be a list",
        ),
        (
            r#"{"format_version": 2, "components": [{"path": "a.B"}]}"#,
            "no (string) 'id'",
        ),
        (
            r#"{"format_version": 2, "components": [{"id": "x", "path": "a.B"}], "workflows": [{"id": "x", "path": "a.C"}]}"#,
            "duplicate id x",
        ),
        ("{", "invalid JSON"),
    ];
    for (text, expected) in cases {
        let err = ServerJobConfig::from_json(text).unwrap_err().to_string();
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[actix::test]
async fn nvflare_numpy_persistor_starts_from_nvflares_default_model() {
    let text = config_text("{}", "").replace(
        "fedrun.persistors.NpyModelPersistor",
        "nvflare.app_common.np.np_model_persistor.NPModelPersistor",
    );
    let config = ServerJobConfig::from_json(&text).unwrap();
    let built = within(config.build(&ServerFactories::new(temp_dir("np"))))
        .await
        .unwrap();
    let persistor = built.components[0]
        .1
        .downcast::<fedrun_server::SharedPersistor>()
        .unwrap();
    let model = persistor.0.load().unwrap();
    let expected: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    assert_eq!(model["numpy_key"].to_f32_vec().unwrap(), expected);
    assert_eq!(model["numpy_key"].shape(), &[3, 3]);
}

#[test]
fn a_config_file_is_read_and_its_errors_name_the_file() {
    let dir = temp_dir("file");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config_fed_server.json");
    std::fs::write(&path, config_text(r#"{"dir": "out"}"#, "")).unwrap();
    let config = ServerJobConfig::from_file(&path).unwrap();
    assert_eq!(config.components.len(), 3);
    std::fs::write(&path, "{\"format_version\": 3}").unwrap();
    let err = ServerJobConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("config_fed_server.json") && err.contains("format_version 3"),
        "{err}"
    );
    assert!(matches!(
        ServerJobConfig::from_file(dir.join("missing.json")),
        Err(ServerError::Io { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}
