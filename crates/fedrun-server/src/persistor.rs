//! Model persistence: where a training workflow's first model comes from and where its models
//! go.
//!
//! [`ModelPersistor`] is the pluggable part (NVFlare's `ModelPersistor`); [`NpyPersistor`] is
//! the built-in one: a directory with one `.npy` file per array — readable by `numpy.load` —
//! and a `model.json` index naming each array's file, dtype and shape. Persistors are
//! synchronous (file I/O); workflows run them on the blocking pool.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use fedrun_core::NdArray;
use fedrun_engine::Component;
use serde_json::{json, Value as Json};

use crate::error::ServerError;
use crate::model::ModelWeights;

/// The index file of a model directory.
pub const MODEL_INDEX: &str = "model.json";

/// The `format` of [`MODEL_INDEX`].
pub const MODEL_INDEX_FORMAT: &str = "fedrun-npy-model";

/// Loads the initial model and saves models (NVFlare's model persistor).
///
/// # Example
/// ```
/// use std::sync::Mutex;
/// use fedrun_server::{ModelPersistor, ModelWeights, ServerError};
///
/// /// Keeps the model in memory.
/// #[derive(Default)]
/// struct InMemory(Mutex<ModelWeights>);
/// impl ModelPersistor for InMemory {
///     fn load(&self) -> Result<ModelWeights, ServerError> {
///         Ok(self.0.lock().map(|m| m.clone()).unwrap_or_default())
///     }
///     fn save(&self, model: &ModelWeights) -> Result<(), ServerError> {
///         if let Ok(mut m) = self.0.lock() {
///             *m = model.clone();
///         }
///         Ok(())
///     }
/// }
/// assert!(InMemory::default().load().unwrap().is_empty());
/// ```
pub trait ModelPersistor: Send + Sync {
    /// The model training starts from.
    ///
    /// # Errors
    ///
    /// [`ServerError::NoInitialModel`] when there is none; I/O and format errors.
    fn load(&self) -> Result<ModelWeights, ServerError>;

    /// Saves `model` (the global model after a round, and the final one).
    ///
    /// # Errors
    ///
    /// I/O errors.
    fn save(&self, model: &ModelWeights) -> Result<(), ServerError>;
}

/// A persistor as a job component (what config factories build and workflows look up by id).
#[derive(Clone)]
pub struct SharedPersistor(pub Arc<dyn ModelPersistor>);

impl Component for SharedPersistor {}

impl std::fmt::Debug for SharedPersistor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedPersistor")
    }
}

/// Where an [`NpyPersistor`] gets its first model.
#[derive(Clone, Debug, PartialEq)]
pub enum InitialModel {
    /// The model saved in the persistor's own directory (an error when there is none).
    Saved,
    /// A model given in code.
    Weights(ModelWeights),
    /// A model directory: one written by [`save_npy_model`], or any directory of `.npy` files
    /// (each file's stem is the array's name).
    Dir(PathBuf),
}

/// Saves models as `.npy` files in a directory; loads its initial model from code, a directory,
/// or what it saved before.
///
/// # Example
/// ```
/// use fedrun_core::NdArray;
/// use fedrun_server::{ModelPersistor, ModelWeights, NpyPersistor};
///
/// let dir = std::env::temp_dir().join(format!("fedrun-doc-{}", std::process::id()));
/// let mut model = ModelWeights::new();
/// model.insert("layer.0/w".into(), NdArray::from_f32(&[2], &[0.5, 1.5]).unwrap());
/// let persistor = NpyPersistor::new(&dir).with_initial_weights(model.clone());
/// assert_eq!(persistor.load().unwrap(), model);
/// persistor.save(&model).unwrap();
/// assert_eq!(NpyPersistor::new(&dir).load().unwrap(), model);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct NpyPersistor {
    /// Where models are saved.
    pub dir: PathBuf,
    /// Where the first model comes from.
    pub initial: InitialModel,
}

impl NpyPersistor {
    /// A persistor saving into `dir` and starting from the model saved there.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        NpyPersistor {
            dir: dir.into(),
            initial: InitialModel::Saved,
        }
    }

    /// Starts from `weights`.
    pub fn with_initial_weights(mut self, weights: ModelWeights) -> Self {
        self.initial = InitialModel::Weights(weights);
        self
    }

    /// Starts from the model in directory `dir`.
    pub fn with_initial_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.initial = InitialModel::Dir(dir.into());
        self
    }
}

impl ModelPersistor for NpyPersistor {
    fn load(&self) -> Result<ModelWeights, ServerError> {
        match &self.initial {
            InitialModel::Weights(w) => Ok(w.clone()),
            InitialModel::Dir(dir) => load_npy_model(dir),
            InitialModel::Saved => {
                if self.dir.join(MODEL_INDEX).is_file() {
                    load_npy_model(&self.dir)
                } else {
                    Err(ServerError::NoInitialModel(format!(
                        "no initial model was given and {} has no {MODEL_INDEX}",
                        self.dir.display()
                    )))
                }
            }
        }
    }

    fn save(&self, model: &ModelWeights) -> Result<(), ServerError> {
        save_npy_model(&self.dir, model)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The file name of an array: its name with every byte outside `[A-Za-z0-9_.-]` (and a
/// leading `.`) written as `%XX`, plus `.npy`.
pub fn npy_file_name(array_name: &str) -> String {
    let mut out = String::with_capacity(array_name.len() + 4);
    for (i, b) in array_name.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    out.push_str(".npy");
    out
}

/// The array name of a file stem written by [`npy_file_name`] (stems of other files are taken
/// as they are, undecodable escapes included).
fn decode_stem(stem: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let bytes = stem.as_bytes();
    if bytes == b"%" {
        return String::new();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(hi * 16 + lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| stem.to_owned())
}

/// Writes `model` into `dir` (created if needed): one `.npy` per array, then `model.json`.
/// Each file is written to a temporary name and renamed, and the index is written last, so a
/// crash never leaves an index naming half-written files.
///
/// # Errors
///
/// [`ServerError::Io`].
pub fn save_npy_model(dir: &Path, model: &ModelWeights) -> Result<(), ServerError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut entries = Vec::with_capacity(model.len());
    for (name, array) in model {
        let file = npy_file_name(name);
        write_atomically(&dir.join(&file), array.npy())?;
        entries.push(json!({
            "name": name,
            "file": file,
            "dtype": array.descr(),
            "shape": array.shape(),
        }));
    }
    let index = json!({ "format": MODEL_INDEX_FORMAT, "version": 1, "arrays": entries });
    let text = serde_json::to_vec_pretty(&index).map_err(|e| ServerError::BadModelFile {
        path: dir.join(MODEL_INDEX),
        reason: e.to_string(),
    })?;
    write_atomically(&dir.join(MODEL_INDEX), &text)?;
    log::info!(
        "model with {} array(s) saved to {}",
        model.len(),
        dir.display()
    );
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Reads a model directory: the arrays `model.json` lists, or, without an index, every `.npy`
/// file (named by its decoded stem).
///
/// # Errors
///
/// [`ServerError::Io`], [`ServerError::BadModelFile`] (bad index, invalid `.npy`, an index that
/// does not match its file), [`ServerError::NoInitialModel`] for a directory without arrays.
pub fn load_npy_model(dir: &Path) -> Result<ModelWeights, ServerError> {
    let index_path = dir.join(MODEL_INDEX);
    let mut model = ModelWeights::new();
    if index_path.is_file() {
        let text = fs::read(&index_path).map_err(io(&index_path))?;
        let bad = |reason: String| ServerError::BadModelFile {
            path: index_path.clone(),
            reason,
        };
        let index: Json = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if index.get("format").and_then(Json::as_str) != Some(MODEL_INDEX_FORMAT) {
            return Err(bad(format!("'format' is not \"{MODEL_INDEX_FORMAT}\"")));
        }
        let arrays = index
            .get("arrays")
            .and_then(Json::as_array)
            .ok_or_else(|| bad("'arrays' is not a list".to_owned()))?;
        for entry in arrays {
            let field = |key: &str| {
                entry
                    .get(key)
                    .and_then(Json::as_str)
                    .ok_or_else(|| bad(format!("an array entry has no string '{key}'")))
            };
            let name = field("name")?;
            let file = field("file")?;
            if file.contains(['/', '\\']) || file.starts_with('.') {
                return Err(bad(format!("file {file:?} is not a plain file name")));
            }
            let array = read_npy(&dir.join(file))?;
            if let Some(descr) = entry.get("dtype").and_then(Json::as_str) {
                if descr != array.descr() {
                    return Err(bad(format!(
                        "{file} holds {} but the index says {descr}",
                        array.descr()
                    )));
                }
            }
            model.insert(name.to_owned(), array);
        }
    } else {
        let listing = fs::read_dir(dir).map_err(io(dir))?;
        for item in listing {
            let item = item.map_err(io(dir))?;
            let path = item.path();
            if path.extension().and_then(|e| e.to_str()) != Some("npy") || !path.is_file() {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let name = decode_stem(stem);
            let array = read_npy(&path)?;
            model.insert(name, array);
        }
    }
    if model.is_empty() {
        return Err(ServerError::NoInitialModel(format!(
            "{} holds no array",
            dir.display()
        )));
    }
    log::info!(
        "model with {} array(s) loaded from {}",
        model.len(),
        dir.display()
    );
    Ok(model)
}

/// Reads one `.npy` file.
///
/// # Errors
///
/// [`ServerError::Io`], [`ServerError::BadModelFile`] for invalid content.
pub fn read_npy(path: &Path) -> Result<NdArray, ServerError> {
    let bytes = fs::read(path).map_err(io(path))?;
    NdArray::from_npy(Bytes::from(bytes)).map_err(|e| ServerError::BadModelFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_safe_and_decode_back() {
        for name in [
            "w",
            "layer.0.weight",
            "a/b",
            ".hidden",
            "sp ace",
            "é",
            "%",
            "",
        ] {
            let file = npy_file_name(name);
            assert!(!file.contains('/') && !file.starts_with('.'), "{file}");
            let stem = file.strip_suffix(".npy").unwrap_or_default();
            assert_eq!(decode_stem(stem), name, "{file}");
        }
        assert_eq!(npy_file_name("layer.0.weight"), "layer.0.weight.npy");
    }
}
