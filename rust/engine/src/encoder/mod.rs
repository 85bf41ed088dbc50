//! Encoder models (bidirectional, no KV cache) and the pooling of their hidden states: the
//! engine's embedding path. A step runs whole requests (vLLM does not chunk encoder prompts):
//! one forward over the flattened tokens of every request, attention within each request only.

pub mod batch;
pub mod head;
pub mod pooling;
pub mod runner;

use anyhow::{anyhow, Result};
use mlx_rs::Array;

use crate::weights::Weights;
pub use batch::{EncoderBatch, EncoderInput};

pub trait Encoder: Send {
    /// Hidden states `[T, hidden]` of the batch's flattened tokens.
    fn forward(&self, batch: &EncoderBatch) -> Result<Array>;
    fn hidden_size(&self) -> usize;
    /// Tokens a request may hold (its position table).
    fn max_positions(&self) -> usize;
    /// Every weight array (materialised at load; their bytes are the weights' memory).
    fn weights(&self) -> Vec<&Array>;
    /// The classifier head of a sequence classifier / cross-encoder (None: an embedding model).
    fn classifier(&self) -> Option<&head::Classifier> {
        None
    }
}

/// An encoder family: the config architectures it runs and its loader (which parses the config
/// its own way: encoder configs share little with decoder ones).
pub struct EncoderFamily {
    pub architectures: &'static [&'static str],
    pub load: fn(&serde_json::Value, &mut Weights) -> Result<Box<dyn Encoder>>,
}

/// Every encoder family the engine runs.
pub static ENCODERS: &[EncoderFamily] = &[
    crate::models::bert::BERT,
    crate::models::bert::BERT_CLASSIFIER,
    crate::models::xlm_roberta::XLM_ROBERTA,
    crate::models::xlm_roberta::XLM_ROBERTA_CLASSIFIER,
];

pub fn family(architecture: &str) -> Option<&'static EncoderFamily> {
    ENCODERS.iter().find(|f| f.architectures.contains(&architecture))
}

pub fn architectures() -> impl Iterator<Item = &'static str> {
    ENCODERS.iter().flat_map(|f| f.architectures.iter().copied())
}

/// The encoder family of a config.json value.
pub fn family_of(config: &serde_json::Value) -> Result<&'static EncoderFamily> {
    let arch = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .unwrap_or("");
    family(arch).ok_or_else(|| {
        anyhow!(
            "unsupported encoder architecture {arch:?}: vllm-metal-rs runs {}",
            architectures().collect::<Vec<_>>().join(", ")
        )
    })
}
