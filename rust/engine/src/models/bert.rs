//! BERT encoders (`BertModel`: all-MiniLM, bge, e5; `BertForSequenceClassification`:
//! cross-encoders): absolute positions and token types added to the word embeddings, post-norm
//! blocks of bidirectional attention and a GELU MLP. RoBERTa-style models (xlm_roberta.rs) are
//! the same blocks with offset positions and their own head.

use anyhow::{bail, Result};
use mlx_rs::Array;
use serde::Deserialize;

use crate::encoder::head::Classifier;
use crate::encoder::{Encoder, EncoderBatch, EncoderFamily};
use crate::layers::linear::Linear;
use crate::layers::mlp::Activation;
use crate::layers::norm::LayerNorm;
use crate::weights::{Bias, Weights};

pub const BERT: EncoderFamily = EncoderFamily {
    architectures: &["BertModel"],
    load: load_bert,
};
pub const BERT_CLASSIFIER: EncoderFamily = EncoderFamily {
    architectures: &["BertForSequenceClassification"],
    load: load_bert_classifier,
};

/// What differs between the models built from BERT's blocks.
#[derive(Debug, Clone, Copy)]
pub struct BertOptions {
    /// Position of a request's first token in the position table (RoBERTa: pad_token_id + 1).
    pub position_offset: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub position_embedding_type: Option<String>,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f32 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

impl BertConfig {
    fn validate(&self) -> Result<()> {
        if let Some(kind) = self.position_embedding_type.as_deref().filter(|k| *k != "absolute") {
            bail!("unsupported position_embedding_type {kind:?} for BertModel: supported is absolute");
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        Activation::from_name(&self.hidden_act)?;
        Ok(())
    }
}

struct BertLayer {
    /// query, key, value stacked (one matmul), or apart when their quantizations differ.
    qkv: Vec<Linear>,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub struct Bert {
    classifier: Option<Classifier>,
    position_offset: usize,
    // Embedding tables as linears: MLX-quantized checkpoints quantize all three.
    word_embeddings: Linear,
    position_embeddings: Linear,
    token_type_embeddings: Linear,
    embeddings_norm: LayerNorm,
    layers: Vec<BertLayer>,
    heads: i32,
    scale: f32,
    act: Activation,
    config: BertConfig,
}

fn load_bert(value: &serde_json::Value, w: &mut Weights) -> Result<Box<dyn Encoder>> {
    let config: BertConfig = serde_json::from_value(value.clone())?;
    // BertModel checkpoints name tensors from the model; task heads put them under "bert.".
    let root = if w.contains("bert.embeddings.word_embeddings.weight") {
        "bert."
    } else {
        ""
    };
    Ok(Box::new(Bert::load(
        config,
        w,
        root,
        BertOptions { position_offset: 0 },
    )?))
}

fn load_bert_classifier(value: &serde_json::Value, w: &mut Weights) -> Result<Box<dyn Encoder>> {
    let config: BertConfig = serde_json::from_value(value.clone())?;
    let mut bert = Bert::load(config, w, "bert.", BertOptions { position_offset: 0 })?;
    bert.set_classifier(Classifier::bert_pooler(w, "bert.")?);
    Ok(Box::new(bert))
}

impl Bert {
    /// The encoder whose tensors are named `{root}embeddings...`, `{root}encoder.layer...`.
    pub fn load(config: BertConfig, w: &mut Weights, root: &str, opts: BertOptions) -> Result<Self> {
        config.validate()?;
        if config.max_position_embeddings <= opts.position_offset {
            bail!(
                "max_position_embeddings {} leaves no positions after the offset {}",
                config.max_position_embeddings,
                opts.position_offset
            );
        }
        let eps = config.layer_norm_eps;
        let e = format!("{root}embeddings");
        let word_embeddings = w.linear(&format!("{e}.word_embeddings"), Bias::Absent)?;
        if word_embeddings.out_features() as usize != config.vocab_size {
            bail!(
                "word embeddings have {} rows but config.json says vocab_size {}",
                word_embeddings.out_features(),
                config.vocab_size
            );
        }
        let position_embeddings = w.linear(&format!("{e}.position_embeddings"), Bias::Absent)?;
        let token_type_embeddings = w.linear(&format!("{e}.token_type_embeddings"), Bias::Absent)?;
        let embeddings_norm = w.layer_norm(&format!("{e}.LayerNorm"), eps)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("{root}encoder.layer.{i}");
            let parts = ["query", "key", "value"].map(|n| w.linear(&format!("{p}.attention.self.{n}"), Bias::Present));
            let [q, k, v] = parts;
            let (q, k, v) = (q?, k?, v?);
            let qkv = match Linear::stack_rows(&[&q, &k, &v])? {
                Some(stacked) => vec![stacked],
                None => vec![q, k, v],
            };
            layers.push(BertLayer {
                qkv,
                attention_output: w.linear(&format!("{p}.attention.output.dense"), Bias::Present)?,
                attention_norm: w.layer_norm(&format!("{p}.attention.output.LayerNorm"), eps)?,
                intermediate: w.linear(&format!("{p}.intermediate.dense"), Bias::Present)?,
                output: w.linear(&format!("{p}.output.dense"), Bias::Present)?,
                output_norm: w.layer_norm(&format!("{p}.output.LayerNorm"), eps)?,
            });
        }
        let heads = config.num_attention_heads as i32;
        let head_dim = (config.hidden_size / config.num_attention_heads) as f32;
        Ok(Bert {
            classifier: None,
            position_offset: opts.position_offset,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
            heads,
            scale: head_dim.powf(-0.5),
            act: Activation::from_name(&config.hidden_act)?,
            config,
        })
    }

    pub fn set_classifier(&mut self, classifier: Classifier) {
        self.classifier = Some(classifier);
    }
}

impl BertLayer {
    fn forward(&self, x: &Array, batch: &EncoderBatch, heads: i32, scale: f32, act: Activation) -> Result<Array> {
        let hidden = x.shape()[1];
        let (q, k, v) = match self.qkv.as_slice() {
            [stacked] => {
                let mut parts = stacked.forward_split(x, &[hidden, 2 * hidden])?.into_iter();
                (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap())
            }
            [q, k, v] => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            _ => unreachable!("qkv holds one stacked or three linears"),
        };
        let attn = batch.attention(&q, &k, &v, heads, scale)?;
        let x = self
            .attention_norm
            .forward(&x.add(self.attention_output.forward(&attn)?)?)?;
        let h = act.forward(&self.intermediate.forward(&x)?)?;
        self.output_norm.forward(&x.add(self.output.forward(&h)?)?)
    }
}

impl Bert {
    fn positions(&self, batch: &EncoderBatch) -> Result<Array> {
        Ok(match self.position_offset {
            0 => batch.positions.clone(),
            k => batch.positions.add(Array::from_int(k as i32))?,
        })
    }
}

impl Encoder for Bert {
    fn forward(&self, batch: &EncoderBatch) -> Result<Array> {
        let mut x = self
            .word_embeddings
            .rows(&batch.token_ids)?
            .add(self.position_embeddings.rows(&self.positions(batch)?)?)?
            .add(self.token_type_embeddings.rows(&batch.token_types)?)?;
        x = self.embeddings_norm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, batch, self.heads, self.scale, self.act)?;
        }
        Ok(x)
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings - self.position_offset
    }

    fn classifier(&self) -> Option<&Classifier> {
        self.classifier.as_ref()
    }

    fn weights(&self) -> Vec<&Array> {
        let mut v = self.word_embeddings.arrays();
        v.extend(self.position_embeddings.arrays());
        v.extend(self.token_type_embeddings.arrays());
        v.extend([&self.embeddings_norm.weight, &self.embeddings_norm.bias]);
        v.extend(self.classifier.iter().flat_map(Classifier::arrays));
        for l in &self.layers {
            for lin in l.qkv.iter().chain([&l.attention_output, &l.intermediate, &l.output]) {
                v.extend(lin.arrays());
            }
            for n in [&l.attention_norm, &l.output_norm] {
                v.extend([&n.weight, &n.bias]);
            }
        }
        v
    }
}
