//! Pooling: one vector per request from its tokens' hidden states (mean / first / last token),
//! then, per request, Matryoshka truncation and L2 normalisation.

use anyhow::{bail, Result};
use mlx_rs::{transforms::eval, Array, Dtype};

/// Which tokens make a request's vector (the model's pooler config says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingKind {
    /// The mean over the request's tokens (sentence-transformers' mean pooling).
    Mean,
    /// The first token (BERT's [CLS]).
    Cls,
    /// The last token (decoder embedders).
    Last,
}

impl std::str::FromStr for PoolingKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "MEAN" => Ok(Self::Mean),
            "CLS" => Ok(Self::Cls),
            "LAST" => Ok(Self::Last),
            other => bail!("unsupported pooling type {other:?}: supported are MEAN, CLS, LAST"),
        }
    }
}

/// What one request asks of its vector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolOptions {
    /// Keep the first `dimensions` features (Matryoshka models), before normalising.
    pub dimensions: Option<usize>,
    /// vLLM's use_activation: L2-normalise an embedding, or apply a classifier's activation.
    pub use_activation: bool,
}

/// What a pooling request of a decoder model asks (vLLM's PoolingParams, read once).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolingParams {
    /// vLLM's pooling task ("embed", "classify"); None: the model's.
    pub task: Option<String>,
    pub options: PoolOptions,
}

/// The pooled float32 vector of each request (`spans`: (first flat token, length) in `hidden`).
pub fn pool(hidden: &Array, spans: &[(usize, usize)], kind: PoolingKind, opts: &[PoolOptions]) -> Result<Vec<Vec<f32>>> {
    if spans.len() != opts.len() {
        bail!("{} requests but {} pooling options", spans.len(), opts.len());
    }
    embeddings(&pooled_rows(hidden, spans, kind)?, opts)
}

/// One float32 row `[R, hidden]` per request, on the device.
pub fn pooled_rows(hidden: &Array, spans: &[(usize, usize)], kind: PoolingKind) -> Result<Array> {
    let hidden = hidden.as_dtype(Dtype::Float32)?;
    let rows = match kind {
        PoolingKind::Cls | PoolingKind::Last => {
            let at: Vec<i32> = spans
                .iter()
                .map(|&(s, n)| (if kind == PoolingKind::Cls { s } else { s + n - 1 }) as i32)
                .collect();
            hidden.take_axis(&Array::from_slice(&at, &[at.len() as i32]), 0)?
        }
        PoolingKind::Mean => {
            // [R, T] averaging weights: small next to the hidden states for encoder batches.
            let t = hidden.shape()[0] as usize;
            let mut w = vec![0f32; spans.len() * t];
            for (r, &(s, n)) in spans.iter().enumerate() {
                w[r * t + s..r * t + s + n].fill(1.0 / n as f32);
            }
            Array::from_slice(&w, &[spans.len() as i32, t as i32]).matmul(&hidden)?
        }
    };
    Ok(rows)
}

/// Pooled rows as embeddings: per request truncated to its dimensions, then normalised.
pub fn embeddings(rows: &Array, opts: &[PoolOptions]) -> Result<Vec<Vec<f32>>> {
    let width = rows.shape()[1] as usize;
    eval([rows])?;
    if rows.shape()[0] as usize != opts.len() {
        bail!("{} pooled rows but {} pooling options", rows.shape()[0], opts.len());
    }
    let host = rows.as_slice::<f32>();
    opts.iter().enumerate().map(|(r, o)| finish_embedding(&host[r * width..(r + 1) * width], o)).collect()
}

/// One pooled row as the request asks: truncated to its dimensions, then normalised.
pub fn finish_embedding(full: &[f32], o: &PoolOptions) -> Result<Vec<f32>> {
    let width = full.len();
    let dims = match o.dimensions {
        None => width,
        Some(d) if d >= 1 && d <= width => d,
        Some(d) => bail!("dimensions {d} is outside 1..={width} for this model"),
    };
    let mut v = full[..dims].to_vec();
    if o.use_activation {
        // As torch's F.normalize: divide by max(norm, 1e-12).
        let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_each_span() {
        // Two requests: rows 0..3 and 3..4 of a [4, 2] hidden state.
        let h = Array::from_slice(&[1f32, 2., 3., 4., 5., 6., 7., 8.], &[4, 2]);
        let spans = [(0, 3), (3, 1)];
        let plain = [PoolOptions::default(); 2];
        assert_eq!(pool(&h, &spans, PoolingKind::Mean, &plain).unwrap(), vec![vec![3., 4.], vec![7., 8.]]);
        assert_eq!(pool(&h, &spans, PoolingKind::Cls, &plain).unwrap(), vec![vec![1., 2.], vec![7., 8.]]);
        assert_eq!(pool(&h, &spans, PoolingKind::Last, &plain).unwrap(), vec![vec![5., 6.], vec![7., 8.]]);
        let opts = [PoolOptions { dimensions: Some(1), use_activation: true }, PoolOptions { dimensions: None, use_activation: true }];
        let v = pool(&h, &spans, PoolingKind::Last, &opts).unwrap();
        assert_eq!(v[0], vec![1.0]);
        assert!((v[1][0] - 7.0 / 113f32.sqrt()).abs() < 1e-6);
        assert!(pool(&h, &spans, PoolingKind::Cls, &[PoolOptions { dimensions: Some(3), use_activation: false }; 2]).is_err());
    }
}
