//! One encoder step's tensors: the requests' tokens flattened (the linears run over real tokens
//! only) and, for attention, each request's tokens padded to the longest request of its group.

use anyhow::{bail, Result};
use mlx_rs::{fast, fast::ScaledDotProductAttentionMask, Array};

/// One request's input: its token ids and, for models with segment embeddings, its token types.
#[derive(Debug, Clone, Copy)]
pub struct EncoderInput<'a> {
    pub tokens: &'a [i32],
    pub token_types: Option<&'a [i32]>,
}

pub struct EncoderBatch {
    pub num_tokens: usize,
    /// `[T]`.
    pub token_ids: Array,
    /// `[T]`: each token's position inside its request, from 0.
    pub positions: Array,
    /// `[T]`: segment ids (0 where a request gives none).
    pub token_types: Array,
    /// Per request, in input order: (first flat token, length).
    pub spans: Vec<(usize, usize)>,
    num_seqs: i32,
    max_len: i32,
    /// `[R * L]`: the flat token feeding each padded row (padding repeats the request's first token).
    pad_index: Array,
    /// `[T]`: the padded row of each flat token.
    out_index: Array,
    /// `[R, 1, 1, L]`: 0 for a request's keys, -inf for its padding; None when nothing is padded.
    key_mask: Option<Array>,
}

impl EncoderBatch {
    pub fn build(inputs: &[EncoderInput]) -> Result<Self> {
        if inputs.is_empty() {
            bail!("an encoder batch needs at least one request");
        }
        let max_len = inputs.iter().map(|i| i.tokens.len()).max().unwrap_or(0);
        let (mut ids, mut pos, mut types) = (Vec::new(), Vec::new(), Vec::new());
        let mut spans = Vec::with_capacity(inputs.len());
        let mut pad_index = Vec::with_capacity(inputs.len() * max_len);
        let mut out_index = Vec::new();
        let mut mask = Vec::with_capacity(inputs.len() * max_len);
        for (r, input) in inputs.iter().enumerate() {
            let n = input.tokens.len();
            if n == 0 {
                bail!("request {r} of the encoder batch has no tokens");
            }
            if let Some(t) = input.token_types {
                if t.len() != n {
                    bail!("request {r}: {} token types for {n} tokens", t.len());
                }
            }
            let start = ids.len();
            spans.push((start, n));
            ids.extend_from_slice(input.tokens);
            pos.extend(0..n as i32);
            match input.token_types {
                Some(t) => types.extend_from_slice(t),
                None => types.extend(std::iter::repeat_n(0, n)),
            }
            for j in 0..max_len {
                pad_index.push((start + j.min(n - 1)) as i32);
                mask.push(if j < n { 0.0f32 } else { f32::NEG_INFINITY });
            }
            out_index.extend((0..n).map(|j| (r * max_len + j) as i32));
        }
        let (t, r, l) = (ids.len() as i32, inputs.len() as i32, max_len as i32);
        let padded = inputs.iter().any(|i| i.tokens.len() < max_len);
        Ok(Self {
            num_tokens: ids.len(),
            token_ids: Array::from_slice(&ids, &[t]),
            positions: Array::from_slice(&pos, &[t]),
            token_types: Array::from_slice(&types, &[t]),
            spans,
            num_seqs: r,
            max_len: l,
            pad_index: Array::from_slice(&pad_index, &[r * l]),
            out_index: Array::from_slice(&out_index, &[t]),
            key_mask: padded.then(|| Array::from_slice(&mask, &[r, 1, 1, l])),
        })
    }

    /// Attention of every request over its own tokens (no causal mask): q, k, v `[T, heads * d]`
    /// in, `[T, heads * d]` out.
    pub fn attention(&self, q: &Array, k: &Array, v: &Array, heads: i32, scale: f32) -> Result<Array> {
        let (r, l) = (self.num_seqs, self.max_len);
        let width = q.shape()[1];
        let d = width / heads;
        let padded = |x: &Array| -> Result<Array> {
            Ok(x.take_axis(&self.pad_index, 0)?.reshape(&[r, l, heads, d])?.transpose_axes(&[0, 2, 1, 3])?)
        };
        let (qp, kp, vp) = (padded(q)?, padded(k)?, padded(v)?);
        let out = match &self.key_mask {
            None => fast::scaled_dot_product_attention(&qp, &kp, &vp, scale, None, None)?,
            Some(m) => {
                let m = m.as_dtype(q.dtype())?;
                fast::scaled_dot_product_attention(&qp, &kp, &vp, scale, ScaledDotProductAttentionMask::Array(&m), None)?
            }
        };
        let flat = out.transpose_axes(&[0, 2, 1, 3])?.reshape(&[r * l, width])?;
        Ok(flat.take_axis(&self.out_index, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_layout_of_mixed_lengths() {
        let (a, b) = ([5, 6, 7], [8]);
        let types = [0, 1, 1];
        let batch = EncoderBatch::build(&[
            EncoderInput { tokens: &a, token_types: Some(&types) },
            EncoderInput { tokens: &b, token_types: None },
        ])
        .unwrap();
        assert_eq!(batch.spans, vec![(0, 3), (3, 1)]);
        assert_eq!(batch.positions.as_slice::<i32>(), &[0, 1, 2, 0]);
        assert_eq!(batch.token_types.as_slice::<i32>(), &[0, 1, 1, 0]);
        assert_eq!(batch.pad_index.as_slice::<i32>(), &[0, 1, 2, 3, 3, 3]);
        assert_eq!(batch.out_index.as_slice::<i32>(), &[0, 1, 2, 3]);
        let mask = batch.key_mask.as_ref().unwrap().as_slice::<f32>().to_vec();
        assert_eq!(mask[..4], [0.0, 0.0, 0.0, 0.0]);
        assert!(mask[4].is_infinite() && mask[5].is_infinite());
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(EncoderBatch::build(&[]).is_err());
        assert!(EncoderBatch::build(&[EncoderInput { tokens: &[], token_types: None }]).is_err());
        assert!(EncoderBatch::build(&[EncoderInput { tokens: &[1, 2], token_types: Some(&[0]) }]).is_err());
    }
}
