//! NVFlare's `NPModelPersistor`: the server model of the hello-numpy jobs, in one `.npy` file.
//!
//! A job that names `nvflare.app_common.np.np_model_persistor.NPModelPersistor` expects its
//! files where NVFlare puts them, so this persistor keeps NVFlare's layout rather than fedrun's
//! model directories: the model is the single array `numpy_key`, saved as
//! `<base>/<model_dir>/<model_name>` (default `models/server.npy`, `<base>` being NVFlare's run
//! directory of the job), and the first model is, in NVFlare's order:
//!
//! 1. `source_ckpt_file_full_name`, when given: an absolute path, or one relative to
//!    `<base>/custom`; it must exist and be a valid `.npy` file (an error otherwise);
//! 2. the file saved before at `<base>/<model_dir>/<model_name>` (an unreadable file is
//!    logged and skipped, as NVFlare does);
//! 3. `model`, a (nested) list of numbers, as `float32`;
//! 4. NVFlare's default `[[1, 2, 3], [4, 5, 6], [7, 8, 9]]` as `float32`.
//!
//! `model_dir/model_name` must be relative and stay inside `<base>` (NVFlare refuses others);
//! here that is checked when the persistor is built.

use std::path::{Component as PathPart, Path, PathBuf};

use fedrun_core::NdArray;
use serde_json::Value as Json;

use crate::error::ServerError;
use crate::model::ModelWeights;
use crate::persistor::{read_npy, ModelPersistor};

/// The array name of NVFlare's numpy model (`NPConstants.NUMPY_KEY`).
pub const NP_NUMPY_KEY: &str = "numpy_key";
/// NVFlare's default `model_dir`.
pub const NP_DEFAULT_MODEL_DIR: &str = "models";
/// NVFlare's default `model_name`.
pub const NP_DEFAULT_MODEL_NAME: &str = "server.npy";
/// NVFlare's folder of a job app's custom code, where a relative checkpoint path points.
pub const CUSTOM_FOLDER: &str = "custom";
/// The largest number of elements a `model` list may describe (64 Mi).
pub const MAX_LIST_MODEL_ELEMENTS: usize = 64 << 20;

/// NVFlare's `NPModelPersistor` (see the module doc).
///
/// # Example
/// ```
/// use fedrun_server::{ModelPersistor, NpModelPersistor};
///
/// let base = std::env::temp_dir().join(format!("np-persistor-doc-{}", std::process::id()));
/// let p = NpModelPersistor::new(&base, "models", "server.npy").unwrap();
/// let model = p.load().unwrap();
/// assert_eq!(model["numpy_key"].shape(), &[3, 3]);
/// p.save(&model).unwrap();
/// assert!(base.join("models/server.npy").is_file());
/// assert!(NpModelPersistor::new(&base, "../elsewhere", "server.npy").is_err());
/// # std::fs::remove_dir_all(&base).unwrap();
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct NpModelPersistor {
    base: PathBuf,
    file: PathBuf,
    model: Option<NdArray>,
    source_ckpt: Option<PathBuf>,
}

impl NpModelPersistor {
    /// A persistor keeping its model at `<base>/<model_dir>/<model_name>`.
    ///
    /// # Errors
    ///
    /// [`ServerError::Config`] when that path is absolute or leaves `base`.
    pub fn new(base: &Path, model_dir: &str, model_name: &str) -> Result<Self, ServerError> {
        let relative = format!("{model_dir}/{model_name}");
        let file = under_root(base, &relative).ok_or_else(|| {
            ServerError::Config(format!(
                "NPModelPersistor: model path {relative} must be relative to and stay inside {}",
                base.display()
            ))
        })?;
        Ok(Self {
            base: base.to_owned(),
            file,
            model: None,
            source_ckpt: None,
        })
    }

    /// Falls back to `model` (NVFlare's `model` argument: a nested list of numbers, made a
    /// `float32` array) instead of NVFlare's 3x3 default.
    ///
    /// # Errors
    ///
    /// [`ServerError::Config`] for a list that is ragged, holds something other than numbers,
    /// or is larger than [`MAX_LIST_MODEL_ELEMENTS`].
    pub fn with_model_list(mut self, model: &Json) -> Result<Self, ServerError> {
        self.model = Some(
            list_to_f32_array(model)
                .map_err(|e| ServerError::Config(format!("NPModelPersistor: model {e}")))?,
        );
        Ok(self)
    }

    /// Starts from the checkpoint file `path` (NVFlare's `source_ckpt_file_full_name`): absolute,
    /// or relative to `<base>/custom`.
    pub fn with_source_ckpt(mut self, path: &str) -> Self {
        let p = Path::new(path);
        self.source_ckpt = Some(if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(CUSTOM_FOLDER).join(p)
        });
        self
    }

    /// The model file: `<base>/<model_dir>/<model_name>`.
    pub fn file(&self) -> &Path {
        &self.file
    }

    fn fallback(&self) -> Result<NdArray, ServerError> {
        match &self.model {
            Some(a) => Ok(a.clone()),
            None => {
                let values: Vec<f32> = (1u8..=9).map(f32::from).collect();
                NdArray::from_f32(&[3, 3], &values).map_err(|e| ServerError::Config(e.to_string()))
            }
        }
    }
}

impl ModelPersistor for NpModelPersistor {
    fn load(&self) -> Result<ModelWeights, ServerError> {
        let array = if let Some(ckpt) = &self.source_ckpt {
            if !ckpt.exists() {
                return Err(ServerError::NoInitialModel(format!(
                    "NPModelPersistor: source checkpoint not found: {}",
                    ckpt.display()
                )));
            }
            log::info!(
                "NPModelPersistor: loading model from source checkpoint {}",
                ckpt.display()
            );
            read_npy(ckpt)?
        } else {
            match read_npy(&self.file) {
                Ok(a) => {
                    log::info!(
                        "NPModelPersistor: loaded model from {}",
                        self.file.display()
                    );
                    a
                }
                Err(e) => {
                    log::info!(
                        "NPModelPersistor: unable to load model from {}: {e}; using the \
                         fallback model",
                        self.file.display()
                    );
                    self.fallback()?
                }
            }
        };
        let mut model = ModelWeights::new();
        model.insert(NP_NUMPY_KEY.to_owned(), array);
        Ok(model)
    }

    fn save(&self, model: &ModelWeights) -> Result<(), ServerError> {
        let array = model.get(NP_NUMPY_KEY).ok_or_else(|| {
            ServerError::Config(format!(
                "NPModelPersistor: the model has no {NP_NUMPY_KEY} array to save"
            ))
        })?;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ServerError::Io { path, source }
        };
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::write(&self.file, array.npy()).map_err(io(&self.file))?;
        log::info!(
            "NPModelPersistor: saved numpy model to {}",
            self.file.display()
        );
        Ok(())
    }
}

/// `root/relative` when `relative` is relative and, read lexically, stays inside `root`.
fn under_root(root: &Path, relative: &str) -> Option<PathBuf> {
    let mut parts = Vec::new();
    for part in Path::new(relative).components() {
        match part {
            PathPart::Normal(p) => parts.push(p),
            PathPart::CurDir => {}
            PathPart::ParentDir => {
                parts.pop()?;
            }
            PathPart::RootDir | PathPart::Prefix(_) => return None,
        }
    }
    let mut path = root.to_owned();
    path.extend(parts);
    Some(path)
}

/// `numpy.array(list, dtype=float32)` for a rectangular nested list of numbers (or one number).
fn list_to_f32_array(value: &Json) -> Result<NdArray, String> {
    let mut shape = Vec::new();
    let mut probe = value;
    while let Json::Array(items) = probe {
        shape.push(items.len());
        match items.first() {
            Some(first) => probe = first,
            None => break,
        }
    }
    let count = shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d))
        .filter(|n| *n <= MAX_LIST_MODEL_ELEMENTS)
        .ok_or_else(|| format!("has more than {MAX_LIST_MODEL_ELEMENTS} elements"))?;
    let mut values = Vec::with_capacity(count);
    fn walk(v: &Json, shape: &[usize], out: &mut Vec<f32>) -> Result<(), String> {
        match (v, shape.split_first()) {
            (Json::Array(items), Some((n, rest))) if items.len() == *n => {
                items.iter().try_for_each(|i| walk(i, rest, out))
            }
            (Json::Array(_), _) => Err("is a ragged list".to_owned()),
            (Json::Number(x), None) => {
                out.push(x.as_f64().ok_or("holds a number out of range")? as f32);
                Ok(())
            }
            (Json::Bool(b), None) => {
                out.push(f32::from(u8::from(*b)));
                Ok(())
            }
            (other, None) => Err(format!("holds {other}, not a number")),
            (_, Some(_)) => Err("is a ragged list".to_owned()),
        }
    }
    walk(value, &shape, &mut values)?;
    NdArray::from_f32(&shape, &values).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn temp_base() -> PathBuf {
        std::env::temp_dir().join(format!("fedrun-np-persistor-{}", uuid::Uuid::new_v4()))
    }

    #[test]
    fn default_model_then_the_saved_file_at_model_dir_model_name() {
        let base = temp_base();
        let p = NpModelPersistor::new(&base, "m", "x.npy").unwrap();
        let first = p.load().unwrap();
        let expected: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        assert_eq!(first[NP_NUMPY_KEY].to_f32_vec().unwrap(), expected);
        assert_eq!(first[NP_NUMPY_KEY].descr(), "<f4");
        let mut next = ModelWeights::new();
        next.insert(
            NP_NUMPY_KEY.into(),
            NdArray::from_f32(&[2], &[5.0, 6.0]).unwrap(),
        );
        p.save(&next).unwrap();
        assert_eq!(
            std::fs::read_dir(base.join("m")).unwrap().count(),
            1,
            "one file"
        );
        assert_eq!(
            std::fs::read(base.join("m/x.npy")).unwrap(),
            next[NP_NUMPY_KEY].npy().to_vec()
        );
        assert_eq!(
            p.load().unwrap(),
            next,
            "a saved model wins over the default"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn model_list_checkpoint_and_bad_paths() {
        let base = temp_base();
        let p = NpModelPersistor::new(&base, "models", "server.npy")
            .unwrap()
            .with_model_list(&json!([[1, 2], [3, 4.5]]))
            .unwrap();
        let m = p.load().unwrap();
        assert_eq!(m[NP_NUMPY_KEY].shape(), &[2, 2]);
        assert_eq!(
            m[NP_NUMPY_KEY].to_f32_vec().unwrap(),
            vec![1.0, 2.0, 3.0, 4.5]
        );
        assert!(NpModelPersistor::new(&base, "models", "s.npy")
            .unwrap()
            .with_model_list(&json!([[1, 2], [3]]))
            .is_err());
        let missing = NpModelPersistor::new(&base, "models", "server.npy")
            .unwrap()
            .with_source_ckpt("ckpt.npy");
        let err = missing.load().unwrap_err().to_string();
        assert!(err.contains("custom") && err.contains("ckpt.npy"), "{err}");
        std::fs::create_dir_all(base.join("custom")).unwrap();
        let ck = NdArray::from_f64(&[1], &[7.0]).unwrap();
        std::fs::write(base.join("custom/ckpt.npy"), ck.npy()).unwrap();
        assert_eq!(missing.load().unwrap()[NP_NUMPY_KEY], ck);
        assert!(NpModelPersistor::new(&base, "/abs", "server.npy").is_err());
        assert!(NpModelPersistor::new(&base, "a/../..", "server.npy").is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
