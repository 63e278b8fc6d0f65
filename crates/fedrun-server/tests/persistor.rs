//! The `.npy` model persistor: files written, re-loaded, and refused when damaged.
#![allow(clippy::unwrap_used)]

mod common;

use fedrun_core::NdArray;
use fedrun_server::{
    load_npy_model, save_npy_model, ModelPersistor, ModelWeights, NpyPersistor, ServerError,
};

use common::temp_dir;

fn model() -> ModelWeights {
    let mut m = ModelWeights::new();
    m.insert(
        "conv1.weight".into(),
        NdArray::from_f32(&[2, 3], &[0.5, -1.25, 3.0, 1e-7, f32::MAX, -0.0]).unwrap(),
    );
    m.insert(
        "dense/bias".into(),
        NdArray::from_f64(&[3], &[1.0 / 3.0, 2.5, -7.0]).unwrap(),
    );
    m.insert("scalar".into(), NdArray::from_f32(&[], &[42.0]).unwrap());
    m
}

#[test]
fn the_persistor_writes_npy_files_that_reload_to_the_same_arrays() {
    let dir = temp_dir("persist");
    let persistor = NpyPersistor::new(&dir).with_initial_weights(model());
    assert_eq!(persistor.load().unwrap(), model());
    persistor.save(&model()).unwrap();

    // one .npy per array (names made file-safe) plus the index
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "conv1.weight.npy",
            "dense%2Fbias.npy",
            "model.json",
            "scalar.npy"
        ]
    );
    // each file is a plain numpy file holding exactly the array
    let bytes = std::fs::read(dir.join("conv1.weight.npy")).unwrap();
    let array = NdArray::from_npy(bytes.into()).unwrap();
    assert_eq!(&array, &model()["conv1.weight"]);
    assert_eq!(
        &bytes_of(&dir, "dense%2Fbias.npy"),
        model()["dense/bias"].npy()
    );

    // a persistor starting from what was saved, and a plain load, give the same model
    assert_eq!(NpyPersistor::new(&dir).load().unwrap(), model());
    assert_eq!(load_npy_model(&dir).unwrap(), model());
    let other = temp_dir("persist-initial");
    let from_dir = NpyPersistor::new(&other).with_initial_dir(&dir);
    assert_eq!(from_dir.load().unwrap(), model());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn bytes_of(dir: &std::path::Path, file: &str) -> bytes::Bytes {
    bytes::Bytes::from(std::fs::read(dir.join(file)).unwrap())
}

#[test]
fn a_directory_of_npy_files_without_index_loads_by_file_stem() {
    let dir = temp_dir("plain");
    std::fs::create_dir_all(&dir).unwrap();
    let a = NdArray::from_f32(&[2], &[1.0, 2.0]).unwrap();
    std::fs::write(dir.join("numpy_key.npy"), a.npy()).unwrap();
    std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
    let loaded = load_npy_model(&dir).unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded["numpy_key"], a);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_or_damaged_models_are_typed_errors() {
    let dir = temp_dir("missing");
    assert!(matches!(
        NpyPersistor::new(&dir).load(),
        Err(ServerError::NoInitialModel(_))
    ));
    save_npy_model(&dir, &model()).unwrap();
    std::fs::write(dir.join("scalar.npy"), b"not numpy").unwrap();
    let err = load_npy_model(&dir).unwrap_err();
    assert!(
        matches!(&err, ServerError::BadModelFile { path, .. } if path.ends_with("scalar.npy")),
        "{err}"
    );
    std::fs::write(dir.join("model.json"), b"{\"format\": \"something else\"}").unwrap();
    assert!(matches!(
        load_npy_model(&dir),
        Err(ServerError::BadModelFile { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}
