//! Logistic regression on synthetic data: the real (small) model `fedrun simulate` trains.
//!
//! A federation needs something to learn that needs no download and shows, round after round,
//! that federated averaging works. Every site generates its own binary-classification data from
//! its own seed, but all sites label their points with the same hidden "true" model derived from
//! the global seed, so their data agree and the averaged model improves for all of them. Sites
//! get different numbers of samples, so FedAvg's weighting by sample count matters.
//!
//! This module is plain arithmetic (no engine, no messages): [`LogRegParams`] (the trainer's
//! arguments), [`Dataset`] and [`generate_site_data`], [`Model`] with [`Model::train`] (mini-batch
//! SGD in `f32`) and [`Model::evaluate`]. The executor that puts it on the task protocol is in
//! [`crate::trainer`].

use serde_json::Value as Json;

use crate::error::CliError;
use crate::rng::{derive_seed, SplitMix64};

/// The trainer's arguments, as a job config's `args` gives them.
///
/// # Example
/// ```
/// use fedrun_cli::logreg::LogRegParams;
///
/// let args = serde_json::json!({"lr": 0.5, "n_features": 4});
/// let p = LogRegParams::from_args(args.as_object().unwrap()).unwrap();
/// assert_eq!(p.lr, 0.5);
/// assert_eq!(p.n_features, 4);
/// assert_eq!(p.epochs, LogRegParams::default().epochs);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LogRegParams {
    /// Learning rate of plain SGD (`lr`).
    pub lr: f32,
    /// Local epochs per round (`epochs`).
    pub epochs: u32,
    /// Mini-batch size (`batch_size`).
    pub batch_size: usize,
    /// Number of features (`n_features`); the model has `n_features` weights and one bias.
    pub n_features: usize,
    /// Global seed (`seed`): fixes the true model and, with the site name, each site's data.
    pub seed: u64,
    /// Mean number of samples per site (`samples`); each site draws its own count in
    /// `[samples / 2, 3 * samples / 2]`.
    pub samples: usize,
    /// Fraction of a site's samples held out for evaluation (`val_fraction`).
    pub val_fraction: f64,
    /// Standard deviation of the noise added to the true logit before labelling
    /// (`label_noise`), so that no model reaches 100 % accuracy.
    pub label_noise: f64,
}

impl Default for LogRegParams {
    fn default() -> Self {
        Self {
            lr: 0.05,
            epochs: 1,
            batch_size: 16,
            n_features: 10,
            seed: 42,
            samples: 400,
            val_fraction: 0.25,
            label_noise: 0.5,
        }
    }
}

impl LogRegParams {
    /// Reads the arguments; absent ones keep their [`Default`] values, unknown ones are ignored
    /// (with a warning), wrong types or out-of-range values are an error.
    pub fn from_args(args: &serde_json::Map<String, Json>) -> Result<Self, CliError> {
        let mut p = Self::default();
        for (key, value) in args {
            let bad = |what: &str| CliError::BadArgument {
                component: "LogRegTrainer".to_owned(),
                arg: key.clone(),
                reason: format!("expected {what}, got {value}"),
            };
            match key.as_str() {
                "lr" => p.lr = value.as_f64().ok_or_else(|| bad("a number"))? as f32,
                "epochs" => {
                    p.epochs = value
                        .as_u64()
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| bad("a non-negative integer"))?
                }
                "batch_size" => p.batch_size = as_usize(value).ok_or_else(|| bad("an integer"))?,
                "n_features" => p.n_features = as_usize(value).ok_or_else(|| bad("an integer"))?,
                "seed" => {
                    p.seed = value
                        .as_u64()
                        .ok_or_else(|| bad("a non-negative integer"))?
                }
                "samples" => p.samples = as_usize(value).ok_or_else(|| bad("an integer"))?,
                "val_fraction" => p.val_fraction = value.as_f64().ok_or_else(|| bad("a number"))?,
                "label_noise" => p.label_noise = value.as_f64().ok_or_else(|| bad("a number"))?,
                other => log::warn!("LogRegTrainer: ignoring unknown argument {other}"),
            }
        }
        p.validate()?;
        Ok(p)
    }

    /// Checks the values are usable: positive sizes, a finite positive learning rate, a
    /// validation fraction in `(0, 1)` that leaves training data.
    pub fn validate(&self) -> Result<(), CliError> {
        let bad = |arg: &str, reason: &str| {
            Err(CliError::BadArgument {
                component: "LogRegTrainer".to_owned(),
                arg: arg.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", "must be a finite number > 0");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be > 0");
        }
        if self.n_features == 0 {
            return bad("n_features", "must be > 0");
        }
        if self.samples < 4 {
            return bad("samples", "must be at least 4");
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return bad("val_fraction", "must be in (0, 1)");
        }
        if !(self.label_noise.is_finite() && self.label_noise >= 0.0) {
            return bad("label_noise", "must be a finite number >= 0");
        }
        Ok(())
    }
}

fn as_usize(v: &Json) -> Option<usize> {
    v.as_u64().and_then(|v| usize::try_from(v).ok())
}

/// Labelled points: `x` row-major (`len × n_features`), `y` in `{0, 1}`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    /// Number of features per point.
    pub n_features: usize,
    /// The points, one row of `n_features` values per point.
    pub x: Vec<f32>,
    /// The labels, `0.0` or `1.0`.
    pub y: Vec<f32>,
}

impl Dataset {
    /// Number of points.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// No points?
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Point `i`'s features.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.n_features..(i + 1) * self.n_features]
    }
}

/// One site's data: what it trains on and what it evaluates the global model on.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteData {
    /// The training split.
    pub train: Dataset,
    /// The held-out split.
    pub val: Dataset,
}

/// The hidden model every site labels its data with, and the scale of each feature, derived from
/// the global seed only.
///
/// Features have different scales (log-normal), and the true weights compensate so that every
/// feature matters about as much: plain SGD then learns the large-scale features first and the
/// small-scale ones slowly, so the global model keeps improving over several rounds instead of
/// jumping to its best accuracy at once.
pub fn true_model(params: &LogRegParams) -> (Model, Vec<f32>) {
    let mut rng = SplitMix64::derived(params.seed, "fedrun.logreg.true-model");
    let scales: Vec<f64> = (0..params.n_features)
        .map(|_| (rng.normal() * 0.8).exp())
        .collect();
    // Scaled so that the logit has a standard deviation of about 2: learnable but not trivial.
    let per_feature = 2.0 / (params.n_features as f64).sqrt();
    let w = scales
        .iter()
        .map(|s| (rng.normal() * per_feature / s) as f32)
        .collect();
    let b = (rng.normal() * 0.5) as f32;
    let scales = scales.iter().map(|&s| s as f32).collect();
    (Model { w, b }, scales)
}

/// How many samples `site` has (in `[samples / 2, 3 * samples / 2]`, fixed by seed and name).
pub fn site_sample_count(params: &LogRegParams, site: &str) -> usize {
    let mut rng = SplitMix64::new(derive_seed(params.seed, &format!("{site}/count")));
    let low = params.samples / 2;
    low + rng.below(params.samples as u64 + 1) as usize
}

/// Generates `site`'s data: feature `j` from N(0, scale_j²), label = `w*·x + b* + noise > 0` with the
/// [`true_model`], split into training and held-out parts.
///
/// # Example
/// ```
/// use fedrun_cli::logreg::{generate_site_data, LogRegParams};
///
/// let p = LogRegParams::default();
/// let a = generate_site_data(&p, "site-1");
/// assert_eq!(a, generate_site_data(&p, "site-1")); // deterministic
/// assert_ne!(a.train.len(), generate_site_data(&p, "site-2").train.len());
/// ```
pub fn generate_site_data(params: &LogRegParams, site: &str) -> SiteData {
    let (truth, scales) = true_model(params);
    let n = site_sample_count(params, site);
    let d = params.n_features;
    let mut rng = SplitMix64::new(derive_seed(params.seed, &format!("{site}/data")));
    let mut all = Dataset {
        n_features: d,
        x: Vec::with_capacity(n * d),
        y: Vec::with_capacity(n),
    };
    for _ in 0..n {
        let start = all.x.len();
        all.x.extend(scales.iter().map(|s| s * rng.normal() as f32));
        let logit = f64::from(truth.logit(&all.x[start..])) + rng.normal() * params.label_noise;
        all.y.push(if logit > 0.0 { 1.0 } else { 0.0 });
    }
    // At least one point on each side of the split.
    let n_val = ((n as f64 * params.val_fraction).round() as usize).clamp(1, n - 1);
    let n_train = n - n_val;
    let val = Dataset {
        n_features: d,
        x: all.x.split_off(n_train * d),
        y: all.y.split_off(n_train),
    };
    SiteData { train: all, val }
}

/// A logistic-regression model: `p(y = 1 | x) = sigmoid(w·x + b)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// The weights, one per feature.
    pub w: Vec<f32>,
    /// The bias.
    pub b: f32,
}

/// Loss and accuracy of a model on a dataset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean binary cross-entropy (natural log).
    pub loss: f64,
    /// Fraction of points classified correctly (threshold 0.5).
    pub accuracy: f64,
}

impl Model {
    /// The all-zero model with `n_features` weights (the usual initial global model).
    pub fn zeros(n_features: usize) -> Self {
        Self {
            w: vec![0.0; n_features],
            b: 0.0,
        }
    }

    /// `w·x + b`.
    pub fn logit(&self, x: &[f32]) -> f32 {
        self.w.iter().zip(x).map(|(w, x)| w * x).sum::<f32>() + self.b
    }

    /// Mean loss and accuracy on `data` (an empty set gives loss 0 and accuracy 0).
    ///
    /// # Example
    /// ```
    /// use fedrun_cli::logreg::{Dataset, Model};
    ///
    /// let data = Dataset { n_features: 1, x: vec![1.0, -1.0], y: vec![1.0, 0.0] };
    /// let e = Model::zeros(1).evaluate(&data);
    /// assert!((e.loss - std::f64::consts::LN_2).abs() < 1e-6); // p = 0.5 everywhere
    /// assert_eq!(Model { w: vec![1.0], b: 0.0 }.evaluate(&data).accuracy, 1.0);
    /// ```
    pub fn evaluate(&self, data: &Dataset) -> Evaluation {
        if data.is_empty() {
            return Evaluation {
                loss: 0.0,
                accuracy: 0.0,
            };
        }
        let mut loss = 0.0f64;
        let mut correct = 0usize;
        for (i, &y) in data.y.iter().enumerate() {
            let z = f64::from(self.logit(data.row(i)));
            loss += bce_with_logit(z, f64::from(y));
            if (z > 0.0) == (y > 0.5) {
                correct += 1;
            }
        }
        let n = data.len() as f64;
        Evaluation {
            loss: loss / n,
            accuracy: correct as f64 / n,
        }
    }

    /// Trains in place with mini-batch SGD for `epochs` passes over `data`, in an order shuffled
    /// by `shuffle_seed`. Returns the number of samples processed (`epochs × len`).
    pub fn train(
        &mut self,
        data: &Dataset,
        lr: f32,
        epochs: u32,
        batch_size: usize,
        shuffle_seed: u64,
    ) -> usize {
        let mut rng = SplitMix64::new(shuffle_seed);
        let mut order: Vec<usize> = (0..data.len()).collect();
        let mut grad_w = vec![0.0f32; self.w.len()];
        let batch_size = batch_size.max(1);
        for _ in 0..epochs {
            rng.shuffle(&mut order);
            for batch in order.chunks(batch_size) {
                grad_w.iter_mut().for_each(|g| *g = 0.0);
                let mut grad_b = 0.0f32;
                for &i in batch {
                    let x = data.row(i);
                    let err = sigmoid(self.logit(x)) - data.y[i];
                    grad_w.iter_mut().zip(x).for_each(|(g, x)| *g += err * x);
                    grad_b += err;
                }
                let step = lr / batch.len() as f32;
                self.w
                    .iter_mut()
                    .zip(&grad_w)
                    .for_each(|(w, g)| *w -= step * g);
                self.b -= step * grad_b;
            }
        }
        data.len() * epochs as usize
    }
}

/// The logistic function, without overflow for large `|z|`.
pub fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Binary cross-entropy of label `y` for logit `z`, computed stably:
/// `max(z, 0) - y·z + ln(1 + e^{-|z|})`.
fn bce_with_logit(z: f64, y: f64) -> f64 {
    z.max(0.0) - y * z + (-z.abs()).exp().ln_1p()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn centralised_training_beats_the_zero_model() {
        let p = LogRegParams::default();
        let data = generate_site_data(&p, "site-1");
        let before = Model::zeros(p.n_features).evaluate(&data.val);
        let mut m = Model::zeros(p.n_features);
        for round in 0..10 {
            m.train(&data.train, 0.1, 1, 16, round);
        }
        let after = m.evaluate(&data.val);
        assert!(after.loss < before.loss - 0.2, "{before:?} -> {after:?}");
        assert!(after.accuracy > 0.8, "{after:?}");
    }

    #[test]
    fn sites_share_the_true_model_but_not_their_points() {
        let p = LogRegParams::default();
        let a = generate_site_data(&p, "site-1");
        let b = generate_site_data(&p, "site-2");
        assert_ne!(a.train.x[..10], b.train.x[..10]);
        // The true model classifies both sites' data well (only the label noise is wrong).
        let (truth, _) = true_model(&p);
        assert!(truth.evaluate(&a.val).accuracy > 0.8);
        assert!(truth.evaluate(&b.val).accuracy > 0.8);
        let n = site_sample_count(&p, "site-1");
        assert_eq!(a.train.len() + a.val.len(), n);
        assert!((p.samples / 2..=3 * p.samples / 2).contains(&n));
    }

    #[test]
    fn plain_fedavg_over_four_sites_lowers_the_loss_every_round() {
        let p = LogRegParams::default();
        let sites: Vec<SiteData> = (1..=4)
            .map(|i| generate_site_data(&p, &format!("site-{i}")))
            .collect();
        let mut global = Model::zeros(p.n_features);
        let mut losses = Vec::new();
        for round in 0..5u64 {
            let (mut loss, mut n_val) = (0.0, 0.0);
            let (mut w, mut b, mut n) = (vec![0.0f64; p.n_features], 0.0f64, 0.0f64);
            for site in &sites {
                loss += global.evaluate(&site.val).loss * site.val.len() as f64;
                n_val += site.val.len() as f64;
                let mut local = global.clone();
                local.train(&site.train, p.lr, p.epochs, p.batch_size, round);
                let k = site.train.len() as f64;
                w.iter_mut()
                    .zip(&local.w)
                    .for_each(|(s, x)| *s += f64::from(*x) * k);
                b += f64::from(local.b) * k;
                n += k;
            }
            losses.push(loss / n_val);
            global = Model {
                w: w.iter().map(|x| (x / n) as f32).collect(),
                b: (b / n) as f32,
            };
        }
        assert!(losses.windows(2).all(|p| p[1] < p[0]), "{losses:?}");
    }

    #[test]
    fn sigmoid_and_loss_are_finite_for_extreme_logits() {
        assert_eq!(sigmoid(1000.0), 1.0);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert!(bce_with_logit(1000.0, 0.0).is_finite());
        assert!(bce_with_logit(-1000.0, 1.0).is_finite());
        assert!(bce_with_logit(1000.0, 1.0) < 1e-9);
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let args = serde_json::json!({"lr": "fast"});
        let err = LogRegParams::from_args(args.as_object().unwrap()).unwrap_err();
        assert!(err.to_string().contains("lr"), "{err}");
        let args = serde_json::json!({"batch_size": 0});
        assert!(LogRegParams::from_args(args.as_object().unwrap()).is_err());
        let args = serde_json::json!({"val_fraction": 1.0});
        assert!(LogRegParams::from_args(args.as_object().unwrap()).is_err());
    }
}
