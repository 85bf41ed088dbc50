//! Pooling models on the decoder (Qwen3-Embedding, Qwen3-Reranker): the same step as generation
//! (KV cache, chunked prefill, prefix caching), with a pooled output instead of a token. The
//! request whose chunk reaches the end of its prompt gets its vector (or scores) in that step.

use anyhow::{bail, ensure, Context, Result};
use mlx_rs::{transforms::eval, Array, Dtype};

use super::plan::StepPlan;
use super::{ModelRunner, StepOutput};
use crate::encoder::head::ClassifyOptions;
use crate::encoder::pooling::{finish_embedding, pooled_rows, PoolingKind};

/// What a pooling decoder outputs.
#[derive(Debug, Clone, PartialEq)]
pub enum DecoderHead {
    /// Embeddings: the pooled hidden state after the model's final norm.
    Embed,
    /// A classifier made of LM-head rows (vLLM's conversion of rerankers such as Qwen3-Reranker):
    /// the logits of `tokens` at the pooled position; `two_way` (two tokens, negative then
    /// positive) gives one label, their difference, as vLLM's from_2_way_softmax.
    TokenLogits { tokens: Vec<i32>, two_way: bool },
}

#[derive(Debug, Clone)]
pub struct DecoderPooling {
    pub kind: PoolingKind,
    pub head: DecoderHead,
    pub classify: ClassifyOptions,
}

impl DecoderPooling {
    pub fn task(&self) -> &'static str {
        match self.head {
            DecoderHead::Embed => "embed",
            DecoderHead::TokenLogits { .. } => "classify",
        }
    }
}

impl ModelRunner {
    /// Make this runner a pooling model's (None: generation).
    pub fn set_pooling(&mut self, pooling: Option<DecoderPooling>) -> Result<()> {
        if let Some(p) = &pooling {
            if let DecoderHead::TokenLogits { tokens, two_way } = &p.head {
                ensure!(!tokens.is_empty(), "a token classifier needs at least one token");
                ensure!(!*two_way || tokens.len() == 2, "a two-way classifier takes two tokens, got {}", tokens.len());
                let vocab = self.config.vocab_size as i32;
                if let Some(t) = tokens.iter().find(|&&t| t < 0 || t >= vocab) {
                    bail!("classifier token {t} is outside the vocabulary (0..{vocab})");
                }
                ensure!(p.kind == PoolingKind::Last, "token classifiers pool the last token, not {:?}", p.kind);
            }
        }
        self.pooling = pooling;
        Ok(())
    }

    pub fn pooling(&self) -> Option<&DecoderPooling> {
        self.pooling.as_ref()
    }

    /// The step's pooled rows on the device, one per request whose prompt ends in this step
    /// (before the step's tokens count as computed).
    pub(super) fn submit_pooled(&self, plan: &StepPlan, hidden: &Array) -> Result<Option<Array>> {
        let Some(p) = &self.pooling else { return Ok(None) };
        if plan.sample_rows.is_empty() {
            return Ok(None);
        }
        let n = plan.last_tokens.len() as i32;
        let last = Array::from_slice(&plan.last_tokens, &[n]);
        let rows = match (&p.head, p.kind) {
            (DecoderHead::TokenLogits { tokens, two_way }, _) => {
                let logits = self.model.logits(&hidden.take_axis(&last, 0)?)?;
                let picked = logits.take_axis(&Array::from_slice(tokens, &[tokens.len() as i32]), 1)?;
                if *two_way {
                    let cols = mlx_rs::ops::split_equal(&picked, 2, 1)?;
                    cols[1].subtract(&cols[0])?
                } else {
                    picked
                }
            }
            (DecoderHead::Embed, PoolingKind::Last) => self.model.final_norm(&hidden.take_axis(&last, 0)?)?,
            (DecoderHead::Embed, kind) => {
                // MEAN / CLS read the whole prompt, which vLLM schedules in one step for them.
                let mut spans = Vec::with_capacity(plan.sample_rows.len());
                for (&i, &end) in plan.sample_rows.iter().zip(&plan.last_tokens) {
                    let (id, len) = &plan.scheduled[i];
                    let s = self.table.state(id)?;
                    ensure!(
                        s.num_computed == 0,
                        "request {id}: {kind:?} pooling needs its whole prompt in one step (chunked prefill and prefix caching off)"
                    );
                    spans.push((end as usize + 1 - len, *len));
                }
                pooled_rows(&self.model.final_norm(hidden)?, &spans, kind)?
            }
        };
        Ok(Some(rows.as_dtype(Dtype::Float32)?))
    }

    /// The second half of a pooling model's step: the vectors (or scores) of the requests whose
    /// prompt ended, each as its request asks. A request asking what its vector cannot give
    /// (dimensions beyond the model's) fails alone.
    pub fn pool_step(&mut self) -> Result<StepOutput> {
        let (id, pending) = self.pipeline.take_pending();
        let Some(p) = pending else { return Ok(StepOutput { step_id: Some(id), ..Default::default() }) };
        let n = p.plan.scheduled.len();
        let mut out = StepOutput {
            step_id: Some(id),
            req_ids: p.plan.scheduled.iter().map(|(r, _)| r.clone()).collect(),
            sampled_token_ids: vec![Vec::new(); n],
            pooled: vec![None; n],
            failed: p.failed,
            ..Default::default()
        };
        let Some(rows) = p.pooled else { return Ok(out) };
        let pooling = self.pooling.clone().context("a pooled step on a generation runner")?;
        if let Err(e) = eval([&rows]) {
            let e = anyhow::Error::from(e).context("on the device");
            self.fail_all(&p.plan.scheduled, &mut out.failed, &e);
            return Ok(out);
        }
        let width = rows.shape()[1] as usize;
        let host = rows.as_slice::<f32>();
        for (r, &i) in p.plan.sample_rows.iter().enumerate() {
            let req_id = &p.plan.scheduled[i].0;
            let row = &host[r * width..(r + 1) * width];
            let params = self.table.state(req_id).ok().and_then(|s| s.pooling.clone());
            let result = match params {
                None => Err(anyhow::anyhow!("a generation request reached a pooling model")),
                Some(q) if q.task.as_deref().is_some_and(|t| t != pooling.task()) => Err(anyhow::anyhow!(
                    "pooling task {:?} is not served: this model serves {:?}",
                    q.task.unwrap_or_default(),
                    pooling.task()
                )),
                Some(q) => match pooling.head {
                    DecoderHead::Embed => finish_embedding(row, &q.options),
                    DecoderHead::TokenLogits { .. } => Ok(pooling.classify.scores(row, q.options.use_activation)),
                },
            };
            match result {
                Ok(v) => out.pooled[i] = Some(v),
                Err(e) => {
                    self.table.forget(req_id);
                    out.failed.push((req_id.clone(), format!("{e:#}")));
                }
            }
        }
        Ok(out)
    }
}
