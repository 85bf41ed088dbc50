//! The encoder runner: loads an encoder model and embeds batches of requests.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use mlx_rs::{transforms::eval, Dtype};

use super::head::ClassifyOptions;
use super::pooling::{embeddings, pooled_rows, PoolOptions, PoolingKind};
use super::{family_of, Encoder, EncoderBatch, EncoderInput};
use crate::dtype::{compute_dtype, dtype_name};
use crate::mlx_ext::device::{self, DeviceKind};
use crate::weights::{WeightOptions, WeightSource, Weights};

#[derive(Debug, Clone, Default)]
pub struct EncoderOptions {
    /// None: the GPU when MLX has one, else the CPU.
    pub device: Option<DeviceKind>,
    /// None: float32 on CPU, the checkpoint's dtype on GPU.
    pub dtype: Option<String>,
}

pub struct EncoderRunner {
    model: Box<dyn Encoder>,
    /// How a request's tokens become its vector (vLLM's pooler config; MEAN until set).
    pub pooling: PoolingKind,
    /// How a classifier's logits become scores (vLLM's choice for the model).
    pub classify: ClassifyOptions,
    pub device: DeviceKind,
    pub dtype: Dtype,
    pub weights_nbytes: usize,
    pub vocab_size: usize,
    pub type_vocab_size: usize,
    /// Make the next batch fail once, as an MLX error would (tests of fault isolation).
    fault: std::sync::atomic::AtomicBool,
}

impl EncoderRunner {
    pub fn load(model_path: &Path, opts: &EncoderOptions) -> Result<Self> {
        let start = std::time::Instant::now();
        let device = device::select(opts.device)?;
        let config_path = model_path.join("config.json");
        let text = std::fs::read_to_string(&config_path).with_context(|| format!("reading model config {}", config_path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?;
        let family = family_of(&config)?;
        let checkpoint_dtype = config.get("torch_dtype").or(config.get("dtype")).and_then(|d| d.as_str());
        let dtype = compute_dtype(device, opts.dtype.as_deref(), checkpoint_dtype)?;
        let WeightSource::Safetensors(files) = WeightSource::locate(model_path)? else {
            bail!("encoder weights must be safetensors (GGUF encoders are not supported)");
        };
        let quantization = config.get("quantization").cloned();
        let mut weights = Weights::load_safetensors(&files, quantization, WeightOptions { dtype, dequantize: device == DeviceKind::Cpu })?;
        let model = (family.load)(&config, &mut weights).with_context(|| format!("building the model from {}", model_path.display()))?;
        let leftover = weights.leftover();
        if !leftover.is_empty() {
            log::info!("{} checkpoint tensors unused, e.g. {}", leftover.len(), leftover[0]);
        }
        let arrays = model.weights();
        eval(arrays.iter().copied()).context("materialising weights")?;
        let weights_nbytes = arrays.iter().map(|a| a.nbytes()).sum();
        let count = |k: &str, default: usize| config.get(k).and_then(|v| v.as_u64()).map_or(default, |v| v as usize);
        log::info!(
            "loaded encoder {} from {} on {}: {} {:.1} MiB, {:.2}s",
            family.architectures[0],
            model_path.display(),
            device.name(),
            dtype_name(dtype),
            weights_nbytes as f64 / (1 << 20) as f64,
            start.elapsed().as_secs_f64()
        );
        Ok(Self {
            fault: std::sync::atomic::AtomicBool::new(false),
            pooling: PoolingKind::Mean,
            classify: ClassifyOptions::default(),
            vocab_size: count("vocab_size", 0),
            type_vocab_size: count("type_vocab_size", 1),
            model,
            device,
            dtype,
            weights_nbytes,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.model.hidden_size()
    }

    pub fn max_positions(&self) -> usize {
        self.model.max_positions()
    }

    /// Whether the engine can run this input: an error naming what is out of range.
    pub fn check(&self, input: &EncoderInput) -> Result<()> {
        let n = input.tokens.len();
        ensure!(n > 0, "the input has no tokens");
        ensure!(n <= self.max_positions(), "the input has {n} tokens; this model takes at most {}", self.max_positions());
        if let Some(t) = input.tokens.iter().find(|&&t| t < 0 || t as usize >= self.vocab_size) {
            bail!("token id {t} is outside the vocabulary (0..{})", self.vocab_size);
        }
        if let Some(t) = input.token_types.and_then(|tt| tt.iter().find(|&&t| t < 0 || t as usize >= self.type_vocab_size)) {
            bail!("token type {t} is outside 0..{}", self.type_vocab_size);
        }
        Ok(())
    }

    /// The hidden states `[T, hidden]` (float32, host) of a batch, for tests against references.
    pub fn hidden_states(&self, inputs: &[EncoderInput]) -> Result<(Vec<f32>, Vec<(usize, usize)>)> {
        for i in inputs {
            self.check(i)?;
        }
        let batch = EncoderBatch::build(inputs)?;
        let h = self.model.forward(&batch)?.as_dtype(Dtype::Float32)?;
        eval([&h])?;
        Ok((h.as_slice::<f32>().to_vec(), batch.spans))
    }

    /// The task vLLM runs this model for: "classify" with a classifier head, else "embed".
    pub fn task(&self) -> &'static str {
        if self.model.classifier().is_some() {
            "classify"
        } else {
            "embed"
        }
    }

    pub fn num_labels(&self) -> Option<usize> {
        self.model.classifier().map(|c| c.num_labels())
    }

    /// One output per input, in input order: the pooled vector (embedding models) or the
    /// classifier's scores (classifiers), each as its options ask.
    pub fn embed(&self, inputs: &[EncoderInput], kind: PoolingKind, opts: &[PoolOptions]) -> Result<Vec<Vec<f32>>> {
        for i in inputs {
            self.check(i)?;
        }
        ensure!(inputs.len() == opts.len(), "{} inputs but {} pooling options", inputs.len(), opts.len());
        let batch = EncoderBatch::build(inputs)?;
        let hidden = self.model.forward(&batch)?;
        let rows = pooled_rows(&hidden, &batch.spans, kind)?;
        let Some(head) = self.model.classifier() else { return embeddings(&rows, opts) };
        if let Some(o) = opts.iter().find(|o| o.dimensions.is_some()) {
            bail!("dimensions {} asked of a classifier (its outputs are label scores)", o.dimensions.unwrap_or(0));
        }
        let logits = head.forward(&rows.as_dtype(self.dtype)?)?.as_dtype(Dtype::Float32)?;
        eval([&logits])?;
        let labels = head.num_labels();
        let host = logits.as_slice::<f32>();
        Ok(opts.iter().enumerate().map(|(r, o)| self.classify.scores(&host[r * labels..(r + 1) * labels], o.use_activation)).collect())
    }
}

/// One pooling request of a step: its whole prompt (encoder prompts are never chunked).
#[derive(Debug, Clone)]
pub struct EncoderRequest {
    pub req_id: String,
    pub tokens: Vec<i32>,
    pub token_types: Option<Vec<i32>>,
    /// vLLM's pooling task of the request ("embed", "classify"); None: the model's.
    pub task: Option<String>,
    pub options: PoolOptions,
}

/// What a step hands back: a vector per served request, in step order, and the requests that
/// failed with the reason (the others are served regardless).
#[derive(Debug, Default)]
pub struct EncoderOutput {
    pub req_ids: Vec<String>,
    pub vectors: Vec<Vec<f32>>,
    pub failed: Vec<(String, String)>,
}

impl EncoderRunner {
    /// The vLLM step of an encoder: embed every request with the model's pooling. A request
    /// outside the model's ranges fails alone; when the batch fails on the device, each request
    /// is retried alone so that only the ones that fail by themselves are lost.
    pub fn execute(&self, requests: &[EncoderRequest]) -> EncoderOutput {
        let kind = self.pooling;
        let mut out = EncoderOutput::default();
        let mut ok: Vec<&EncoderRequest> = Vec::with_capacity(requests.len());
        let task = self.task();
        for r in requests {
            if let Some(t) = r.task.as_deref().filter(|t| *t != task) {
                out.failed.push((r.req_id.clone(), format!("pooling task {t:?} is not served: this model serves {task:?}")));
                continue;
            }
            match self.check(&input_of(r)) {
                Ok(()) => ok.push(r),
                Err(e) => out.failed.push((r.req_id.clone(), format!("{e:#}"))),
            }
        }
        if ok.is_empty() {
            return out;
        }
        match self.embed_requests(&ok, kind) {
            Ok(vectors) => {
                out.req_ids = ok.iter().map(|r| r.req_id.clone()).collect();
                out.vectors = vectors;
            }
            Err(batch_err) => {
                log::warn!("encoder step of {} requests failed ({batch_err:#}); retrying each alone", ok.len());
                for r in ok {
                    match self.embed_requests(&[r], kind) {
                        Ok(mut v) => {
                            out.req_ids.push(r.req_id.clone());
                            out.vectors.push(v.remove(0));
                        }
                        Err(e) => out.failed.push((r.req_id.clone(), format!("{e:#}"))),
                    }
                }
            }
        }
        out
    }

    /// Make the next batch fail once (tests of fault isolation).
    pub fn inject_fault(&self) {
        self.fault.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn embed_requests(&self, requests: &[&EncoderRequest], kind: PoolingKind) -> Result<Vec<Vec<f32>>> {
        if self.fault.swap(false, std::sync::atomic::Ordering::SeqCst) {
            bail!("injected fault (forward)");
        }
        let inputs: Vec<EncoderInput> = requests.iter().map(|r| input_of(r)).collect();
        let opts: Vec<PoolOptions> = requests.iter().map(|r| r.options).collect();
        // A panic inside MLX or the engine fails the batch like an error would.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.embed(&inputs, kind, &opts)))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the encoder step panicked")))
    }
}

fn input_of(r: &EncoderRequest) -> EncoderInput<'_> {
    EncoderInput { tokens: &r.tokens, token_types: r.token_types.as_deref() }
}
