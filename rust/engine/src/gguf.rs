//! GGUF checkpoints: the header (tensor names and types, checked before MLX's loader runs), the
//! llama.cpp -> Hugging Face names and row order, and the families that load them.
//!
//! MLX's loader errors on some tensor types without naming them and silently stops at others
//! (returning part of the file), so the types are validated here first.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use mlx_rs::{Array, Dtype};

use crate::config::ModelConfig;
use crate::weights::{WeightOptions, WeightSource, Weights};

/// GGUF tensor types MLX's loader turns into arrays we run.
pub const GGUF_SUPPORTED: &str = "Q4_0, Q4_1, Q8_0, F16, F32";

/// ggml types MLX's loader turns into arrays the engine runs.
const SUPPORTED: &[u32] = &[0, 1, 2, 3, 8]; // F32, F16, Q4_0, Q4_1, Q8_0

pub fn type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        other => return format!("type {other}"),
    };
    name.to_string()
}

struct Reader<R: Read + Seek>(R);

impl<R: Read + Seek> Reader<R> {
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.0.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.0.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > 1 << 24 {
            bail!("implausible string length {n}");
        }
        let mut b = vec![0u8; n as usize];
        self.0.read_exact(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    fn skip(&mut self, n: u64) -> Result<()> {
        self.0.seek(SeekFrom::Current(n as i64))?;
        Ok(())
    }
    /// Skip one metadata value of GGUF value type `t`.
    fn skip_value(&mut self, t: u32) -> Result<()> {
        match t {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => self.string().map(drop),
            9 => {
                let inner = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.skip_value(inner)?;
                }
                Ok(())
            }
            other => bail!("unknown metadata value type {other}"),
        }
    }
}

/// (name, ggml type) of every tensor in the file.
pub fn tensor_types(path: &Path) -> Result<Vec<(String, u32)>> {
    Ok(read_header(path)?.1)
}

/// `general.architecture` of the file (llama.cpp's name: "llama", "qwen2", ...).
pub fn architecture(path: &Path) -> Result<Option<String>> {
    Ok(read_header(path)?.0)
}

/// `general.architecture` and (name, ggml type) of every tensor.
fn read_header(path: &Path) -> Result<(Option<String>, Vec<(String, u32)>)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = Reader(BufReader::new(file));
    let read = |r: &mut Reader<BufReader<File>>| -> Result<(Option<String>, Vec<(String, u32)>)> {
        let mut magic = [0u8; 4];
        r.0.read_exact(&mut magic)?;
        if &magic != b"GGUF" {
            bail!("not a GGUF file (bad magic)");
        }
        let version = r.u32()?;
        if version < 2 {
            bail!("GGUF version {version} is not supported (2 or 3 are)");
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        let mut arch = None;
        for _ in 0..n_kv {
            let key = r.string()?;
            let t = r.u32()?;
            if key == "general.architecture" && t == 8 {
                arch = Some(r.string()?);
            } else {
                r.skip_value(t)?;
            }
        }
        let mut out = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            r.skip(8 * n_dims as u64)?;
            let t = r.u32()?;
            r.u64()?; // offset
            out.push((name, t));
        }
        Ok((arch, out))
    };
    read(&mut r).with_context(|| format!("reading the GGUF header of {} (truncated or corrupt?)", path.display()))
}

/// Fail with the first tensor whose type the engine does not run.
pub fn check_supported(path: &Path) -> Result<()> {
    for (name, t) in tensor_types(path)? {
        if !SUPPORTED.contains(&t) {
            bail!(
                "GGUF {}: tensor {name:?} has type {}, which is not supported (supported: {})",
                path.display(),
                type_name(t),
                GGUF_SUPPORTED
            );
        }
    }
    Ok(())
}

/// llama.cpp tensor names -> Hugging Face names.
fn gguf_to_hf(name: &str) -> Option<String> {
    // Quantized tensors come as `<base>.weight`, `<base>.scales`, `<base>.biases`.
    let (base, suffix) = name.rsplit_once('.')?;
    let hf = match base {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let (layer, part) = base.strip_prefix("blk.")?.split_once('.')?;
            let part = match part {
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{layer}.{part}")
        }
    };
    Some(format!("{hf}.{suffix}"))
}

/// Row order that undoes llama.cpp's Q/K permutation. llama.cpp stores each head's rows with the two
/// rotary halves interleaved (for "traditional" RoPE); HF Llama keeps them as two halves.
fn unpermute_rows(num_heads: usize, rows: usize) -> Vec<i32> {
    let head_dim = rows / num_heads;
    let half = head_dim / 2;
    let mut order = Vec::with_capacity(rows);
    for h in 0..num_heads {
        for j in 0..2 {
            for i in 0..half {
                // HF row (h, j, i) is stored at GGUF row (h, i, j).
                order.push((h * head_dim + i * 2 + j) as i32);
            }
        }
    }
    order
}

/// The GGUF architectures the families load, each with its config architectures:
/// "llama (LlamaForCausalLM, MistralForCausalLM) and qwen2 (Qwen2ForCausalLM)".
pub fn gguf_support() -> String {
    let mut parts: Vec<String> = architectures().iter().map(|(g, archs)| format!("{g} ({})", archs.join(", "))).collect();
    let last = parts.pop().unwrap_or_default();
    if parts.is_empty() { last } else { format!("{} and {last}", parts.join(", ")) }
}

/// The tensors of a GGUF file under HF names, Q/K rows in HF order (quantized ones packed).
pub fn load_hf(path: &Path, config: &ModelConfig) -> Result<HashMap<String, Array>> {
    check_supported(path)?;
    let hf_arch = config.architecture()?;
    let found = architecture(path)?.unwrap_or_else(|| "unknown".into());
    match config.family()?.gguf_architecture {
        Some(expected) if expected == found => {}
        Some(expected) => bail!(
            "GGUF {} has architecture {found:?} but config.json says {hf_arch} (GGUF {expected:?})",
            path.display()
        ),
        None => bail!("GGUF weights are supported for {}, not {hf_arch} (GGUF {found:?})", gguf_support()),
    }
    // llama.cpp permutes Q/K rows for its interleaved RoPE only in llama-architecture files.
    let permute = found == "llama";
    let (num_heads, num_kv_heads) = (config.num_attention_heads, config.num_kv_heads());
    let file = mlx_rs::io::GgufFile::load(path).map_err(|e| {
        anyhow!(
            "cannot load GGUF {}: {e} (supported tensor types: {GGUF_SUPPORTED})",
            path.display()
        )
    })?;
    let arrays = file
        .arrays()
        .map_err(|e| anyhow!("reading tensors of GGUF {}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (name, array) in arrays {
        let Some(hf) = gguf_to_hf(&name) else {
            log::debug!("GGUF tensor {name} is not used");
            continue;
        };
        let heads = if !permute {
            None
        } else if hf.contains("self_attn.q_proj.") {
            Some(num_heads)
        } else if hf.contains("self_attn.k_proj.") {
            Some(num_kv_heads)
        } else {
            None
        };
        // weight, scales and biases of a quantized tensor are all permuted by row: exact, no requantization.
        let array = match heads {
            Some(h) => {
                let rows = array.shape()[0] as usize;
                let order = Array::from_slice(&unpermute_rows(h, rows), &[rows as i32]);
                array.take_axis(&order, 0)?
            }
            None => array,
        };
        out.insert(hf, array);
    }
    Ok(out)
}

/// GGUF architecture -> the config architectures of the families that load it.
pub fn architectures() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut by_gguf: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for f in crate::models::FAMILIES {
        let Some(g) = f.gguf_architecture else { continue };
        match by_gguf.iter_mut().find(|(name, _)| *name == g) {
            Some((_, archs)) => archs.extend(f.architectures),
            None => by_gguf.push((g, f.architectures.to_vec())),
        }
    }
    by_gguf
}

/// The GGUF checkpoint of `model_dir` (config.json + one .gguf) written as float32 safetensors
/// under HF names, quants dequantized: the same weights for engines without a GGUF loader.
/// Returns the number of tensors written.
pub fn export_float32(model_dir: &Path, out: &Path) -> Result<usize> {
    let config = ModelConfig::from_file(&model_dir.join("config.json"))?;
    let source = WeightSource::locate(model_dir)?;
    let WeightSource::Gguf(_) = source else { bail!("{} holds no GGUF checkpoint", model_dir.display()) };
    let weights = Weights::load(&source, &config, WeightOptions { dtype: Dtype::Float32, dequantize: true })?;
    let tensors = weights.into_dense()?;
    Array::save_safetensors(tensors.iter().map(|(n, a)| (n.as_str(), a)), None, out)
        .map_err(|e| anyhow!("writing {}: {e}", out.display()))?;
    Ok(tensors.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_support_names_each_gguf_architecture_with_its_families() {
        assert_eq!(gguf_support(), "llama (LlamaForCausalLM, MistralForCausalLM) and qwen2 (Qwen2ForCausalLM)");
    }

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(gguf_to_hf("blk.3.attn_q.scales").unwrap(), "model.layers.3.self_attn.q_proj.scales");
        assert_eq!(gguf_to_hf("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(gguf_to_hf("token_embd.scales").unwrap(), "model.embed_tokens.scales");
        assert_eq!(gguf_to_hf("output.biases").unwrap(), "lm_head.biases");
        assert!(gguf_to_hf("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, half, ...).swapaxes(1, 2): GGUF row (h, i, j) = HF row (h, j, i).
        let (heads, head_dim) = (3, 8);
        let half = head_dim / 2;
        let mut gguf_rows = vec![0; heads * head_dim]; // gguf position -> hf row
        for h in 0..heads {
            for i in 0..half {
                for j in 0..2 {
                    gguf_rows[h * head_dim + i * 2 + j] = h * head_dim + j * half + i;
                }
            }
        }
        let order = unpermute_rows(heads, heads * head_dim);
        let recovered: Vec<usize> = order.iter().map(|&g| gguf_rows[g as usize]).collect();
        assert_eq!(recovered, (0..heads * head_dim).collect::<Vec<_>>());
    }
}
