//! Qwen2-VL (`Qwen2VLForConditionalGeneration`): the Qwen2 decoder with M-RoPE, fed token
//! embeddings in which each image placeholder (`image_token_id`) is replaced by a row of the
//! vision tower (qwen2_vl_vision.rs).
//! M-RoPE: each token has three positions (t, h, w; equal for text, the image's grid for its
//! placeholders, `multimodal::MropePositions`), and the head's frequencies read them in three
//! consecutive sections (`mrope_section`). Names follow the checkpoint (`model.*`, `visual.*`,
//! `lm_head`; transformers 5's in-memory `model.language_model.*` / `model.visual.*` too).

use anyhow::{bail, ensure, Context, Result};
use mlx_rs::{ops, Array};

use crate::batch::StepBatch;
use crate::config::ModelConfig;
use crate::kv_cache::PagedKvCache;
use crate::layers::rope::SectionedRope;
use crate::models::llama::Model;
use crate::models::qwen2_vl_vision::{VisionConfig, VisionTower};
use crate::models::{full_attention, kv_per_layer, qwen2, CausalLm, Family, PartialRotary, RopeRules};
use crate::multimodal::{ImageGrid, ImageLayout};
use crate::paged_attention::AttentionFeatures;
use crate::weights::Weights;

pub const QWEN2_VL: Family = Family {
    architectures: &["Qwen2VLForConditionalGeneration"],
    gguf_architecture: None,
    validate,
    layer_windows: full_attention,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: PartialRotary::Refused,
    load: |config, w| Ok(Box::new(Qwen2Vl::load(config, w)?)),
};

/// transformers' sections when the config names none.
const DEFAULT_MROPE_SECTION: [usize; 3] = [16, 24, 24];

fn validate(config: &ModelConfig) -> Result<()> {
    qwen2::validate(config)?;
    if let Some(s) = &config.rope_scaling {
        // Pre-5 configs name M-RoPE as the scaling type; any real scaling is not implemented.
        let kind = s.rope_type.as_deref().unwrap_or("default");
        ensure!(kind == "mrope" || kind == "default", "unsupported rope_type {kind:?} for Qwen2-VL: supported is default (M-RoPE)");
    }
    let sections = mrope_section(config)?;
    ensure!(
        sections.iter().sum::<usize>() * 2 == config.rotary_dim(),
        "mrope_section {sections:?} does not cover head_dim / 2 = {} frequencies",
        config.rotary_dim() / 2
    );
    config.image_token_id.context("config.json has no image_token_id")?;
    VisionConfig::from_value(config.vision_config.as_ref())?;
    Ok(())
}

/// `mrope_section` from transformers 5's `rope_parameters` or an older `rope_scaling`.
fn mrope_section(config: &ModelConfig) -> Result<Vec<usize>> {
    let declared = match config.rope_parameters.as_ref().and_then(|p| p.get("mrope_section")) {
        Some(v) => Some(serde_json::from_value::<Vec<usize>>(v.clone()).context("parsing mrope_section")?),
        None => config.rope_scaling.as_ref().and_then(|s| s.mrope_section.clone()),
    };
    let s = declared.unwrap_or_else(|| DEFAULT_MROPE_SECTION.to_vec());
    ensure!(s.len() == 3, "mrope_section {s:?} must have 3 entries (t, h, w)");
    Ok(s)
}

pub struct Qwen2Vl {
    text: Model,
    visual: VisionTower,
    layout: ImageLayout,
}

impl Qwen2Vl {
    fn load(config: &ModelConfig, w: &mut Weights) -> Result<Self> {
        w.rename_prefix("model.language_model.", "model.");
        w.rename_prefix("model.visual.", "visual.");
        let vision = VisionConfig::from_value(config.vision_config.as_ref())?;
        ensure!(
            vision.hidden_size == config.hidden_size,
            "vision_config hidden_size {} differs from the text stack's {}",
            vision.hidden_size,
            config.hidden_size
        );
        let mut text = qwen2::load(config, w)?;
        let sections = mrope_section(config)?;
        for layer in &mut text.layers {
            let Some(rope) = layer.self_attn.rope.as_mut() else { bail!("Qwen2-VL attention without RoPE") };
            rope.sections = Some(SectionedRope::mrope(config.rotary_dim(), config.rope_theta, &sections)?);
        }
        let image_token_id = config.image_token_id.context("config.json has no image_token_id")?;
        let layout = ImageLayout {
            image_token_id: i32::try_from(image_token_id).context("image_token_id out of range")?,
            spatial_merge_size: vision.spatial_merge_size,
        };
        Ok(Self { text, visual: VisionTower::load(vision, w)?, layout })
    }
}

impl CausalLm for Qwen2Vl {
    fn forward(&self, batch: &StepBatch, cache: &mut PagedKvCache) -> Result<Array> {
        let mut h = self.text.embed_tokens.rows(&batch.token_ids)?;
        if let Some(img) = &batch.images {
            // The placeholders' rows come after the token rows; `select` picks each token's.
            let rows = img.rows.as_dtype(h.dtype())?;
            h = ops::concatenate(&[h, rows], 0)?.take_axis(&img.select, 0)?;
        }
        self.text.forward_embeddings(h, batch, cache)
    }

    fn logits(&self, hidden: &Array) -> Result<Array> {
        self.text.logits(hidden)
    }

    fn final_norm(&self, hidden: &Array) -> Result<Array> {
        self.text.final_norm(hidden)
    }

    fn weights(&self) -> Vec<&Array> {
        let mut v = self.text.weights();
        v.extend(self.visual.weights());
        v
    }

    fn attention_features(&self) -> AttentionFeatures {
        self.text.attention_features()
    }

    fn image_layout(&self) -> Option<ImageLayout> {
        Some(self.layout)
    }

    fn embed_images(&self, pixel_values: &Array, grids: &[ImageGrid]) -> Result<Array> {
        ensure!(self.visual.spatial_merge_size() == self.layout.spatial_merge_size, "spatial merge sizes differ");
        self.visual.forward(pixel_values, grids)
    }
}
