//! Classifier heads of cross-encoders and sequence classifiers: from the pooled vector (the
//! first token's hidden state) to one logit per label.

use anyhow::{bail, Result};
use mlx_rs::{ops, Array};

use crate::layers::linear::Linear;
use crate::weights::{Bias, Weights};

/// The two head layouts in use.
pub enum Classifier {
    /// BERT: `bert.pooler.dense` + tanh, then `classifier`.
    BertPooler { dense: Linear, classifier: Linear },
    /// RoBERTa / XLM-R: `classifier.dense` + tanh, then `classifier.out_proj`.
    Roberta { dense: Linear, out_proj: Linear },
}

impl Classifier {
    pub fn bert_pooler(w: &mut Weights, root: &str) -> Result<Self> {
        Ok(Self::BertPooler {
            dense: w.linear(&format!("{root}pooler.dense"), Bias::Present)?,
            classifier: w.linear("classifier", Bias::Present)?,
        })
    }

    pub fn roberta(w: &mut Weights) -> Result<Self> {
        Ok(Self::Roberta {
            dense: w.linear("classifier.dense", Bias::Present)?,
            out_proj: w.linear("classifier.out_proj", Bias::Present)?,
        })
    }

    pub fn num_labels(&self) -> usize {
        match self {
            Self::BertPooler { classifier, .. } => classifier.out_features() as usize,
            Self::Roberta { out_proj, .. } => out_proj.out_features() as usize,
        }
    }

    /// Logits `[R, labels]` of pooled vectors `[R, hidden]`.
    pub fn forward(&self, pooled: &Array) -> Result<Array> {
        let (dense, out) = match self {
            Self::BertPooler { dense, classifier } => (dense, classifier),
            Self::Roberta { dense, out_proj } => (dense, out_proj),
        };
        out.forward(&ops::tanh(&dense.forward(pooled)?)?)
    }

    pub fn arrays(&self) -> Vec<&Array> {
        let (a, b) = match self {
            Self::BertPooler { dense, classifier } => (dense, classifier),
            Self::Roberta { dense, out_proj } => (dense, out_proj),
        };
        let mut v = a.arrays();
        v.extend(b.arrays());
        v
    }
}

/// The activation of classifier logits (vLLM's choice for the model: by its problem type, its
/// sentence-transformers activation, else sigmoid for one label and softmax for several).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifierActivation {
    Identity,
    Sigmoid,
    Softmax,
}

impl std::str::FromStr for ClassifierActivation {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "identity" => Ok(Self::Identity),
            "sigmoid" => Ok(Self::Sigmoid),
            "softmax" => Ok(Self::Softmax),
            other => bail!("unsupported classifier activation {other:?}: identity, sigmoid or softmax"),
        }
    }
}

/// How the model's logits become scores.
#[derive(Debug, Clone, Copy)]
pub struct ClassifyOptions {
    /// `(logit - mean) / sigma` before the activation (vLLM's pooler config; 0 and 1 by default).
    pub logit_mean: f32,
    pub logit_sigma: f32,
    pub activation: ClassifierActivation,
}

impl Default for ClassifyOptions {
    fn default() -> Self {
        Self { logit_mean: 0.0, logit_sigma: 1.0, activation: ClassifierActivation::Identity }
    }
}

impl ClassifyOptions {
    /// One row of logits as scores; `activate`: the request's use_activation.
    pub fn scores(&self, logits: &[f32], activate: bool) -> Vec<f32> {
        let x: Vec<f64> = logits.iter().map(|&l| (l as f64 - self.logit_mean as f64) / self.logit_sigma as f64).collect();
        let y = if !activate {
            x
        } else {
            match self.activation {
                ClassifierActivation::Identity => x,
                ClassifierActivation::Sigmoid => x.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
                ClassifierActivation::Softmax => {
                    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
                    let s: f64 = e.iter().sum();
                    e.iter().map(|v| v / s).collect()
                }
            }
        };
        y.into_iter().map(|v| v as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_follow_the_activation() {
        let o = |activation| ClassifyOptions { logit_mean: 1.0, logit_sigma: 2.0, activation };
        assert_eq!(o(ClassifierActivation::Identity).scores(&[3.0], true), vec![1.0]);
        assert!((o(ClassifierActivation::Sigmoid).scores(&[1.0], true)[0] - 0.5).abs() < 1e-7);
        let s = o(ClassifierActivation::Softmax).scores(&[1.0, 1.0 + 2.0 * 2f32.ln()], true);
        assert!((s[0] - 1.0 / 3.0).abs() < 1e-6 && (s[1] - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(o(ClassifierActivation::Sigmoid).scores(&[5.0], false), vec![2.0]);
    }
}
