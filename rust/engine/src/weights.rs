//! Checkpoint loading: safetensors (single or sharded) and GGUF, into HF-named MLX arrays.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use mlx_rs::{ops, Array, Dtype};

use crate::layers::linear::{Linear, Quantization};
use crate::layers::norm::{LayerNorm, RmsNorm};
use crate::mlx_ext::quant::QuantMode;

#[derive(Debug, Clone)]
pub enum WeightSource {
    Safetensors(Vec<PathBuf>),
    Gguf(PathBuf),
}

impl WeightSource {
    /// Find the weights of a model directory (or a `.gguf` path).
    pub fn locate(model_path: &Path) -> Result<Self> {
        if model_path.is_file() {
            if model_path.extension().is_some_and(|e| e == "gguf") {
                return Ok(Self::Gguf(model_path.to_path_buf()));
            }
            bail!("{} is not a model directory or a .gguf file", model_path.display());
        }
        let index = model_path.join("model.safetensors.index.json");
        if index.is_file() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("reading {}", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{} has no weight_map", index.display()))?;
            let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            let paths: Vec<PathBuf> = files.iter().map(|f| model_path.join(f)).collect();
            for p in &paths {
                if !p.is_file() {
                    bail!("missing safetensors shard {} (listed in {})", p.display(), index.display());
                }
            }
            return Ok(Self::Safetensors(paths));
        }
        let mut safetensors = Vec::new();
        let mut ggufs = Vec::new();
        for entry in std::fs::read_dir(model_path)
            .with_context(|| format!("reading model directory {}", model_path.display()))?
        {
            let path = entry?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("safetensors") => safetensors.push(path),
                Some("gguf") => ggufs.push(path),
                _ => {}
            }
        }
        safetensors.sort();
        ggufs.sort();
        match (safetensors.is_empty(), ggufs.len()) {
            (false, _) => Ok(Self::Safetensors(safetensors)),
            (true, 1) => Ok(Self::Gguf(ggufs.remove(0))),
            (true, 0) => bail!(
                "no weights in {}: expected *.safetensors (or model.safetensors.index.json) or one .gguf file",
                model_path.display()
            ),
            (true, _) => bail!("several .gguf files in {}: pass the path of one", model_path.display()),
        }
    }
}

/// Whether a linear layer carries a `.bias` tensor (configs say it with flags such as
/// `attention_bias`, which convert with `.into()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bias {
    Absent,
    Present,
}

impl From<bool> for Bias {
    fn from(present: bool) -> Self {
        if present {
            Self::Present
        } else {
            Self::Absent
        }
    }
}

/// Tensors by HF name, taken out as the model is built so leftovers can be reported.
pub struct Weights {
    tensors: HashMap<String, Array>,
    /// Compute dtype for floating-point weights.
    pub dtype: Dtype,
    /// Dequantize packed weights at load (the CPU backend has fast matmul for float32 only).
    pub dequantize: bool,
    /// config.json's `quantization` of MLX-quantized checkpoints: `group_size`, `bits`, and
    /// per-layer overrides keyed by layer path (None: GGUF quants, group size 32).
    quantization: Option<serde_json::Value>,
}

/// How `Weights::load` prepares the tensors.
#[derive(Debug, Clone, Copy)]
pub struct WeightOptions {
    /// Compute dtype for floating-point weights.
    pub dtype: Dtype,
    /// Dequantize packed weights at load (the CPU backend has fast matmul for float32 only).
    pub dequantize: bool,
}

impl Weights {
    pub fn load(source: &WeightSource, config: &crate::config::ModelConfig, opts: WeightOptions) -> Result<Self> {
        // mlx-lm writes its quantization under both keys; config validation refused any other.
        let quantization = config.quantization.clone().or_else(|| config.quantization_config.clone());
        match source {
            WeightSource::Safetensors(files) => Self::load_safetensors(files, quantization, opts),
            WeightSource::Gguf(path) => {
                let tensors = crate::gguf::load_hf(path, config)?;
                Ok(Self { tensors, dtype: opts.dtype, dequantize: opts.dequantize, quantization })
            }
        }
    }

    /// Safetensors files, with config.json's MLX `quantization` (if any).
    pub fn load_safetensors(files: &[PathBuf], quantization: Option<serde_json::Value>, opts: WeightOptions) -> Result<Self> {
        let mut tensors = HashMap::new();
        for f in files {
            let part = Array::load_safetensors(f).map_err(|e| {
                anyhow!("cannot load safetensors file {}: {e} (missing, truncated or corrupt?)", f.display())
            })?;
            tensors.extend(part);
        }
        Ok(Self { tensors, dtype: opts.dtype, dequantize: opts.dequantize, quantization })
    }

    /// Checkpoints saved from the bare decoder (`Qwen3Model`: embedding models such as
    /// Qwen3-Embedding) name their tensors without the causal LM's `model.` prefix.
    pub fn prefix_bare_decoder(&mut self) {
        if !self.contains("model.embed_tokens.weight") && self.contains("embed_tokens.weight") {
            let tensors = std::mem::take(&mut self.tensors);
            self.tensors = tensors.into_iter().map(|(k, v)| (format!("model.{k}"), v)).collect();
        }
    }

    /// Tensors named `{from}...` are renamed `{to}...`, and so are their per-layer quantization
    /// entries.
    pub fn rename_prefix(&mut self, from: &str, to: &str) {
        let rename = |k: String| match k.strip_prefix(from) {
            Some(rest) => format!("{to}{rest}"),
            None => k,
        };
        let tensors = std::mem::take(&mut self.tensors);
        self.tensors = tensors.into_iter().map(|(k, v)| (rename(k), v)).collect();
        if let Some(serde_json::Value::Object(q)) = self.quantization.take() {
            self.quantization = Some(serde_json::Value::Object(q.into_iter().map(|(k, v)| (rename(k), v)).collect()));
        }
    }

    /// Experts in OpenAI's MXFP4 layout (gpt-oss as published): `{prefix}_blocks` `[E, out,
    /// in / 32, 16]` uint8 (two FP4 values a byte, the low nibble first) and `{prefix}_scales`
    /// `[E, out, in / 32]` uint8 (E8M0 exponents), which are MLX's `mxfp4` packing viewed as bytes:
    /// the stacked expert linear `[E, out, in]` (dequantized where the weights are dense).
    pub fn mxfp4_experts(&mut self, prefix: &str) -> Result<Linear> {
        let blocks = self.take_raw(&format!("{prefix}_blocks"))?;
        let scales = self.take_raw(&format!("{prefix}_scales"))?;
        let sh = blocks.shape().to_vec();
        ensure!(
            blocks.dtype() == Dtype::Uint8 && scales.dtype() == Dtype::Uint8 && sh.len() == 4 && sh[3] == 16 && scales.shape() == &sh[..3],
            "{prefix}: MXFP4 blocks {:?} ({:?}) and scales {:?} ({:?}) do not match OpenAI's layout",
            sh,
            blocks.dtype(),
            scales.shape(),
            scales.dtype()
        );
        let weight = blocks.view_dtype(Dtype::Uint32)?.reshape(&[sh[0], sh[1], sh[2] * 4])?;
        let quant = Quantization { scales, biases: None, group_size: 32, bits: 4, mode: QuantMode::Mxfp4, dtype: self.dtype };
        if self.dequantize {
            let w = quant.dequantize(&weight, &quant.scales, None)?;
            return Ok(Linear { weight: w, bias: None, quant: None });
        }
        Ok(Linear { weight, bias: None, quant: Some(quant) })
    }

    /// The shape of tensor `name`, if the checkpoint has it.
    pub fn shape(&self, name: &str) -> Option<Vec<i32>> {
        self.tensors.get(name).map(|a| a.shape().to_vec())
    }

    /// transformers 5's own expert layout (`{mlp}.experts.gate_up_proj` `[E, 2I, H]`, the gate
    /// rows first, and `{mlp}.experts.down_proj` `[E, H, I]`, no `.weight` suffix) as the stacked
    /// `{mlp}.switch_mlp.{gate,up,down}_proj.weight` that [`Self::experts`] reads.
    pub fn restack_fused_experts(&mut self) -> Result<()> {
        let bases: Vec<String> =
            self.tensors.keys().filter_map(|k| k.strip_suffix(".experts.gate_up_proj").map(str::to_string)).collect();
        for base in bases {
            let gate_up = self.take_raw(&format!("{base}.experts.gate_up_proj"))?;
            let down = self.take_raw(&format!("{base}.experts.down_proj"))?;
            ensure!(gate_up.ndim() == 3 && gate_up.shape()[1] % 2 == 0, "{base}.experts.gate_up_proj has shape {:?}", gate_up.shape());
            let halves = ops::split_equal(&gate_up, 2, 1)?;
            self.tensors.insert(format!("{base}.switch_mlp.gate_proj.weight"), halves[0].clone());
            self.tensors.insert(format!("{base}.switch_mlp.up_proj.weight"), halves[1].clone());
            self.tensors.insert(format!("{base}.switch_mlp.down_proj.weight"), down);
        }
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn take_raw(&mut self, name: &str) -> Result<Array> {
        self.tensors
            .remove(name)
            .ok_or_else(|| anyhow!("checkpoint has no tensor {name:?}"))
    }

    /// A floating-point tensor in the compute dtype.
    pub fn take(&mut self, name: &str) -> Result<Array> {
        let a = self.take_raw(name)?;
        if !a.dtype().is_float() {
            bail!("tensor {name:?} has dtype {:?}, expected floating point", a.dtype());
        }
        Ok(if a.dtype() == self.dtype { a } else { a.as_dtype(self.dtype)? })
    }

    /// A floating-point tensor in float32 whatever the compute dtype (routing biases, which
    /// transformers keeps in float32).
    pub fn take_f32(&mut self, name: &str) -> Result<Array> {
        let a = self.take_raw(name)?;
        if !a.dtype().is_float() {
            bail!("tensor {name:?} has dtype {:?}, expected floating point", a.dtype());
        }
        Ok(a.as_dtype(Dtype::Float32)?)
    }

    pub fn layer_norm(&mut self, prefix: &str, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm { weight: self.take(&format!("{prefix}.weight"))?, bias: self.take(&format!("{prefix}.bias"))?, eps })
    }

    pub fn rms_norm(&mut self, prefix: &str, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: self.take(&format!("{prefix}.weight"))?, eps })
    }

    /// Gemma's RMSNorm, whose gain is (1 + w): the 1 is added once here, in float32.
    pub fn rms_norm_plus_one(&mut self, prefix: &str, eps: f32) -> Result<RmsNorm> {
        let w = self.take_raw(&format!("{prefix}.weight"))?.as_dtype(Dtype::Float32)?;
        Ok(RmsNorm { weight: w.add(Array::from_f32(1.0))?.as_dtype(self.dtype)?, eps })
    }

    /// `n` expert linears stacked into one `[n, out, in]` linear: read stacked from
    /// `{stacked}.weight` when the checkpoint has it (mlx-lm's `switch_mlp`), else stacked from
    /// `{prefix}.{e}.{name}` (HF).
    pub fn experts(&mut self, prefix: &str, n: usize, name: &str, stacked: &str) -> Result<Linear> {
        if self.contains(&format!("{stacked}.weight")) {
            let l = self.linear(stacked, Bias::Absent)?;
            if l.weight.ndim() != 3 || l.weight.shape()[0] as usize != n {
                bail!("{stacked}.weight has shape {:?}, expected {n} stacked experts", l.weight.shape());
            }
            return Ok(l);
        }
        let parts: Vec<Linear> =
            (0..n).map(|e| self.linear(&format!("{prefix}.{e}.{name}"), Bias::Absent)).collect::<Result<_>>()?;
        let stack = |f: &dyn Fn(&Linear) -> Option<&Array>| -> Result<Option<Array>> {
            let arrays: Vec<&Array> = parts.iter().filter_map(|p| f(p)).collect();
            if arrays.is_empty() {
                return Ok(None);
            }
            Ok(Some(ops::stack(&arrays, 0)?))
        };
        let weight = stack(&|p| Some(&p.weight))?.unwrap();
        let quant = match &parts[0].quant {
            None => None,
            Some(q) => Some(Quantization {
                scales: stack(&|p| p.quant.as_ref().map(|q| &q.scales))?.unwrap(),
                biases: stack(&|p| p.quant.as_ref().and_then(|q| q.biases.as_ref()))?,
                group_size: q.group_size,
                bits: q.bits,
                mode: q.mode,
                dtype: q.dtype,
            }),
        };
        Ok(Linear { weight, bias: None, quant })
    }

    /// Group size and bits of the quantized layer `prefix` (per-layer override, else the default).
    fn quant_params(&self, prefix: &str) -> (i32, Option<i32>) {
        let Some(q) = &self.quantization else { return (32, None) };
        let get = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_i64()).map(|x| x as i32);
        let layer = q.get(prefix).filter(|v| v.is_object()).unwrap_or(q);
        (get(layer, "group_size").or(get(q, "group_size")).unwrap_or(64), get(layer, "bits").or(get(q, "bits")))
    }

    /// A linear layer `prefix.weight` (+ `.scales`/`.biases` when quantized, + `.bias` when present).
    pub fn linear(&mut self, prefix: &str, bias: Bias) -> Result<Linear> {
        let bias = match bias {
            Bias::Present => Some(self.take(&format!("{prefix}.bias"))?),
            Bias::Absent => None,
        };
        let scales_name = format!("{prefix}.scales");
        if !self.contains(&scales_name) {
            return Ok(Linear { weight: self.take(&format!("{prefix}.weight"))?, bias, quant: None });
        }
        let weight = self.take_raw(&format!("{prefix}.weight"))?;
        let scales = self.take_raw(&scales_name)?;
        let biases = self.tensors.remove(&format!("{prefix}.biases"));
        let (declared_group_size, declared_bits) = self.quant_params(prefix);
        // MXFP4 (mlx-lm's `mxfp4` mode) has uint8 scales (powers of two), no biases and groups of
        // 32; affine has float scales and the config's group size.
        let mode = if scales.dtype() == Dtype::Uint8 { QuantMode::Mxfp4 } else { QuantMode::Affine };
        let group_size = if mode == QuantMode::Mxfp4 { 32 } else { declared_group_size };
        // Packed uint32 columns * 32 bits = input features = scale columns * group size.
        let packed = weight.shape()[weight.ndim() - 1];
        let groups = scales.shape()[scales.ndim() - 1];
        let bits = packed * 32 / (groups * group_size);
        if weight.dtype() != Dtype::Uint32 || ![2, 3, 4, 5, 6, 8].contains(&bits) || packed * 32 != bits * groups * group_size {
            bail!("tensor {prefix:?}: unsupported quantized layout (dtype {:?}, {bits} bits at group size {group_size})", weight.dtype());
        }
        if declared_bits.is_some_and(|b| b != bits) {
            bail!("tensor {prefix:?}: config.json says {} bits, the tensor shapes say {bits}", declared_bits.unwrap());
        }
        if mode == QuantMode::Mxfp4 && (bits != 4 || biases.is_some()) {
            bail!("tensor {prefix:?}: uint8 scales (MXFP4) need 4 bits and no biases, got {bits} bits");
        }
        // Affine scales and biases in the compute dtype first: dequantizing in the checkpoint's
        // float16 would round every weight to float16.
        let scales = if mode == QuantMode::Affine { scales.as_dtype(self.dtype)? } else { scales };
        let biases = biases.map(|b| b.as_dtype(self.dtype)).transpose()?;
        let quant = Quantization { scales, biases, group_size, bits, mode, dtype: self.dtype };
        if self.dequantize {
            let w = quant.dequantize(&weight, &quant.scales, quant.biases.as_ref())?;
            return Ok(Linear { weight: w, bias, quant: None });
        }
        Ok(Linear { weight, bias, quant: Some(quant) })
    }

    /// Every tensor in the compute dtype under its HF name, packed weights dequantized: the
    /// checkpoint as a dense one (for other engines to load the same weights).
    pub fn into_dense(mut self) -> Result<Vec<(String, Array)>> {
        self.dequantize = true;
        let quantized: Vec<String> =
            self.tensors.keys().filter_map(|n| n.strip_suffix(".scales")).map(str::to_string).collect();
        let mut out = Vec::with_capacity(self.tensors.len());
        for prefix in quantized {
            out.push((format!("{prefix}.weight"), self.linear(&prefix, Bias::Absent)?.weight));
        }
        for name in self.leftover() {
            let a = self.take(&name)?;
            out.push((name, a));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Names not used by the model (reported, not fatal: e.g. rotary caches in old checkpoints).
    pub fn leftover(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }
}

/// Evaluate the model's weight arrays (reading, converting, stacking them) in slices of about
/// 1% of their bytes (at least 16 MiB), calling `progress(done, total)` in bytes after each:
/// a multi-GB checkpoint shows its progress, at the cost of a few more evaluations.
pub fn materialize(arrays: &[&Array], progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
    let total: usize = arrays.iter().map(|a| a.nbytes()).sum();
    let slice = (total / 100).max(16 << 20);
    let (mut done, mut pending, mut start) = (0, 0, 0);
    progress(0, total);
    for (i, a) in arrays.iter().enumerate() {
        pending += a.nbytes();
        if pending >= slice || i + 1 == arrays.len() {
            mlx_rs::transforms::eval(arrays[start..=i].iter().copied()).context("materialising weights")?;
            done += pending;
            pending = 0;
            start = i + 1;
            progress(done, total);
        }
    }
    Ok(())
}

// GGUF names, row order and supported types: crate::gguf.
