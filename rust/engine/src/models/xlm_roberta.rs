//! XLM-RoBERTa encoders (`XLMRobertaModel`: bge-m3 dense, multilingual e5;
//! `XLMRobertaForSequenceClassification`: bge-reranker): BERT's blocks (bert.rs) with positions
//! counted from pad_token_id + 1 and RoBERTa's classifier head.

use anyhow::Result;

use crate::encoder::head::Classifier;
use crate::encoder::{Encoder, EncoderFamily};
use crate::models::bert::{Bert, BertConfig, BertOptions};
use crate::weights::Weights;

pub const XLM_ROBERTA: EncoderFamily = EncoderFamily { architectures: &["XLMRobertaModel"], load: load_model };
pub const XLM_ROBERTA_CLASSIFIER: EncoderFamily =
    EncoderFamily { architectures: &["XLMRobertaForSequenceClassification"], load: load_classifier };

/// RoBERTa's positions start after the padding index.
fn options(value: &serde_json::Value) -> BertOptions {
    let pad = value.get("pad_token_id").and_then(|p| p.as_u64()).unwrap_or(1) as usize;
    BertOptions { position_offset: pad + 1 }
}

fn load_model(value: &serde_json::Value, w: &mut Weights) -> Result<Box<dyn Encoder>> {
    let config: BertConfig = serde_json::from_value(value.clone())?;
    let root = if w.contains("roberta.embeddings.word_embeddings.weight") { "roberta." } else { "" };
    Ok(Box::new(Bert::load(config, w, root, options(value))?))
}

fn load_classifier(value: &serde_json::Value, w: &mut Weights) -> Result<Box<dyn Encoder>> {
    let config: BertConfig = serde_json::from_value(value.clone())?;
    let mut model = Bert::load(config, w, "roberta.", options(value))?;
    model.set_classifier(Classifier::roberta(w)?);
    Ok(Box::new(model))
}
