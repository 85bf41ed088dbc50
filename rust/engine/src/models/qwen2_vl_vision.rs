//! Qwen2-VL's vision tower (transformers' `Qwen2VisionTransformerPretrainedModel`), names as in
//! the checkpoint under `visual.`: the patch embedding (a Conv3d whose stride is its kernel, so a
//! linear over each flattened patch), 2D rotary positions (rows h and w of each patch), pre-norm
//! LayerNorm blocks of full attention within each image frame and an MLP, and the patch merger
//! (LayerNorm, then each `spatial_merge_size`² window of patches through a two-layer GELU MLP to
//! the text stack's width).

use anyhow::{ensure, Context, Result};
use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::{ops, Array, Dtype};
use serde::Deserialize;

use crate::layers::linear::Linear;
use crate::layers::mlp::Activation;
use crate::layers::norm::LayerNorm;
use crate::layers::rope::SectionedRope;
use crate::multimodal::ImageGrid;
use crate::weights::{Bias, Weights};

/// transformers' LayerNorm eps of every vision norm (not in the config).
const NORM_EPS: f32 = 1e-6;

/// config.json `vision_config`.
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    /// The text stack's width: the merger's output.
    pub hidden_size: usize,
    pub num_heads: usize,
    #[serde(default = "default_in_channels", alias = "in_chans")]
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f32,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub rope_parameters: Option<serde_json::Value>,
}

fn default_in_channels() -> usize {
    3
}
fn default_mlp_ratio() -> f32 {
    4.0
}
fn default_act() -> String {
    "quick_gelu".into()
}

impl VisionConfig {
    pub fn from_value(v: Option<&serde_json::Value>) -> Result<Self> {
        let v = v.context("config.json has no vision_config")?;
        let c: Self = serde_json::from_value(v.clone()).context("parsing vision_config")?;
        ensure!(c.num_heads > 0 && c.embed_dim % c.num_heads == 0, "vision embed_dim {} is not a multiple of num_heads {}", c.embed_dim, c.num_heads);
        ensure!((c.embed_dim / c.num_heads) % 4 == 0, "vision head_dim {} is not a multiple of 4 (2D RoPE over h and w)", c.embed_dim / c.num_heads);
        ensure!(c.spatial_merge_size > 0, "vision spatial_merge_size must be positive");
        VisionAct::from_name(&c.hidden_act)?;
        if let Some(kind) = c.rope_parameters.as_ref().and_then(|r| r.get("rope_type")).and_then(|t| t.as_str()) {
            ensure!(kind == "axial", "unsupported vision rope_type {kind:?}: supported is axial");
        }
        Ok(c)
    }

    fn theta(&self) -> f32 {
        self.rope_parameters.as_ref().and_then(|r| r.get("rope_theta")).and_then(|t| t.as_f64()).unwrap_or(10000.0) as f32
    }

    /// Features of one flattened patch (channels x frames x rows x columns).
    pub fn patch_features(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

#[derive(Debug, Clone, Copy)]
enum VisionAct {
    /// `x * sigmoid(1.702 x)` (the tower's default).
    QuickGelu,
    Other(Activation),
}

impl VisionAct {
    fn from_name(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            other => Activation::from_name(other).map(Self::Other).with_context(|| format!("vision_config hidden_act {other:?} (or quick_gelu)")),
        }
    }

    fn forward(self, x: &Array) -> Result<Array> {
        match self {
            Self::QuickGelu => Ok(x.multiply(ops::sigmoid(x.multiply(Array::from_f32(1.702).as_dtype(x.dtype())?)?)?)?),
            Self::Other(a) => a.forward(x),
        }
    }
}

struct VisionBlock {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct VisionTower {
    config: VisionConfig,
    /// The Conv3d's kernel flattened to `[embed_dim, patch features]`.
    patch_embed: Linear,
    rope: SectionedRope,
    blocks: Vec<VisionBlock>,
    ln_q: LayerNorm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    act: VisionAct,
}

impl VisionTower {
    pub fn load(config: VisionConfig, w: &mut Weights) -> Result<Self> {
        let kernel = w.take("visual.patch_embed.proj.weight")?;
        let features = config.patch_features() as i32;
        ensure!(
            kernel.size() == config.embed_dim * config.patch_features(),
            "visual.patch_embed.proj.weight has shape {:?}, vision_config says [{}, {}, {}, {}, {}]",
            kernel.shape(),
            config.embed_dim,
            config.in_channels,
            config.temporal_patch_size,
            config.patch_size,
            config.patch_size
        );
        let patch_embed = Linear { weight: kernel.reshape(&[config.embed_dim as i32, features])?, bias: None, quant: None };
        let mut blocks = Vec::with_capacity(config.depth);
        for i in 0..config.depth {
            let p = format!("visual.blocks.{i}");
            blocks.push(VisionBlock {
                norm1: w.layer_norm(&format!("{p}.norm1"), NORM_EPS)?,
                qkv: w.linear(&format!("{p}.attn.qkv"), Bias::Present)?,
                proj: w.linear(&format!("{p}.attn.proj"), Bias::Present)?,
                norm2: w.layer_norm(&format!("{p}.norm2"), NORM_EPS)?,
                fc1: w.linear(&format!("{p}.mlp.fc1"), Bias::Present)?,
                fc2: w.linear(&format!("{p}.mlp.fc2"), Bias::Present)?,
            });
        }
        // Axial 2D RoPE: head_dim / 4 frequencies over head_dim / 2 features, once for the row
        // and once for the column of the patch (transformers' `compute_axial_rope_parameters`).
        let head_dim = config.embed_dim / config.num_heads;
        let spatial = head_dim / 2;
        let base: Vec<f32> = (0..spatial / 2).map(|i| 1.0 / config.theta().powf((2 * i) as f32 / spatial as f32)).collect();
        let rows: Vec<i32> = (0..2 * base.len()).map(|i| (i / base.len()) as i32).collect();
        let rope = SectionedRope::new(&[base.clone(), base].concat(), &rows)?;
        let act = VisionAct::from_name(&config.hidden_act)?;
        let merger_fc2 = w.linear("visual.merger.mlp.2", Bias::Present)?;
        ensure!(
            merger_fc2.out_features() as usize == config.hidden_size,
            "visual.merger.mlp.2 gives {} features, vision_config hidden_size is {}",
            merger_fc2.out_features(),
            config.hidden_size
        );
        Ok(Self {
            patch_embed,
            rope,
            blocks,
            ln_q: w.layer_norm("visual.merger.ln_q", NORM_EPS)?,
            merger_fc1: w.linear("visual.merger.mlp.0", Bias::Present)?,
            merger_fc2,
            act,
            config,
        })
    }

    /// `[patches, patch features]` pixel values as transformers' image processor lays them out
    /// (each image's patches frame by frame, merge window by merge window) and each image's grid:
    /// `[patches / spatial_merge_size², hidden_size]`, every image's rows in order.
    pub fn forward(&self, pixel_values: &Array, grids: &[ImageGrid]) -> Result<Array> {
        let c = &self.config;
        let n: usize = grids.iter().map(ImageGrid::patches).sum();
        ensure!(
            pixel_values.ndim() == 2 && pixel_values.shape() == [n as i32, c.patch_features() as i32],
            "pixel_values have shape {:?}, the grids {grids:?} need [{n}, {}]",
            pixel_values.shape(),
            c.patch_features()
        );
        let m = c.spatial_merge_size;
        // Each patch's (row, column) in its image, in the processor's order, and its frame's
        // index: attention stays within a frame (transformers' cu_seqlens).
        let (mut hpos, mut wpos, mut frame) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let mut frames = 0i32;
        for g in grids {
            ensure!(g.h % m == 0 && g.w % m == 0, "image grid {g:?} is not a multiple of spatial_merge_size {m}");
            for _ in 0..g.t {
                for bh in 0..g.h / m {
                    for bw in 0..g.w / m {
                        for ih in 0..m {
                            for iw in 0..m {
                                hpos.push((bh * m + ih) as i32);
                                wpos.push((bw * m + iw) as i32);
                                frame.push(frames);
                            }
                        }
                    }
                }
                frames += 1;
            }
        }
        let ni = n as i32;
        let positions = Array::from_slice(&[hpos, wpos].concat(), &[2, ni]);
        let mask = if frames > 1 {
            let f = Array::from_slice(&frame, &[ni]);
            Some(f.reshape(&[ni, 1])?.eq(&f.reshape(&[1, ni])?)?.reshape(&[1, 1, ni, ni])?)
        } else {
            None
        };
        let dtype = self.patch_embed.weight.dtype();
        let mut x = self.patch_embed.forward(&pixel_values.as_dtype(dtype)?)?;
        for b in &self.blocks {
            let a = self.attention(b, &b.norm1.forward(&x)?, &positions, mask.as_ref())?;
            x = x.add(a)?;
            let h = b.fc2.forward(&self.act.forward(&b.fc1.forward(&b.norm2.forward(&x)?)?)?)?;
            x = x.add(h)?;
        }
        let merged = self.ln_q.forward(&x)?.reshape(&[ni / (m * m) as i32, (c.embed_dim * m * m) as i32])?;
        self.merger_fc2.forward(&Activation::Gelu.forward(&self.merger_fc1.forward(&merged)?)?)
    }

    fn attention(&self, b: &VisionBlock, x: &Array, positions: &Array, mask: Option<&Array>) -> Result<Array> {
        let c = &self.config;
        let (n, heads) = (x.shape()[0], c.num_heads as i32);
        let d = (c.embed_dim / c.num_heads) as i32;
        let qkv = b.qkv.forward(x)?.reshape(&[n, 3, heads, d])?;
        let parts = ops::split_equal(&qkv, 3, 1)?;
        let [q, k, v] = [0, 1, 2].map(|i| parts[i].reshape(&[n, heads, d]));
        let (q, k, v) = (q?, k?, v?);
        // transformers rotates the vision queries and keys in float32.
        let rot = |t: &Array| -> Result<Array> {
            Ok(self.rope.forward(&t.as_dtype(Dtype::Float32)?, positions)?.as_dtype(t.dtype())?)
        };
        let heads_first = |t: Array| t.reshape(&[1, n, heads, d])?.transpose_axes(&[0, 2, 1, 3]);
        let (q, k, v) = (heads_first(rot(&q)?)?, heads_first(rot(&k)?)?, heads_first(v)?);
        let scale = 1.0 / (d as f32).sqrt();
        let o = match mask {
            None => fast::scaled_dot_product_attention(&q, &k, &v, scale, None, None)?,
            Some(m) => fast::scaled_dot_product_attention(&q, &k, &v, scale, ScaledDotProductAttentionMask::Array(m), None)?,
        };
        b.proj.forward(&o.transpose_axes(&[0, 2, 1, 3])?.reshape(&[n, heads * d])?)
    }

    pub fn weights(&self) -> Vec<&Array> {
        let mut linears = vec![&self.patch_embed, &self.merger_fc1, &self.merger_fc2];
        let mut norms = vec![&self.ln_q];
        for b in &self.blocks {
            linears.extend([&b.qkv, &b.proj, &b.fc1, &b.fc2]);
            norms.extend([&b.norm1, &b.norm2]);
        }
        let mut v: Vec<&Array> = linears.into_iter().flat_map(Linear::arrays).collect();
        v.extend(norms.into_iter().flat_map(|n| [&n.weight, &n.bias]));
        v
    }

    pub fn spatial_merge_size(&self) -> usize {
        self.config.spatial_merge_size
    }
}
