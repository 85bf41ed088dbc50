//! A request's images as the text stack sees them: the vision tower's output rows for its
//! placeholder tokens, and the M-RoPE positions (t, h, w) of its tokens. Built once per request
//! (the tower runs once) and read by every step that runs a chunk of it, so a chunked prefill
//! may split an image's placeholder run anywhere.

use anyhow::{bail, ensure, Result};
use mlx_rs::Array;

/// An image's patch grid, as transformers' `image_grid_thw`: frames (after temporal patching),
/// rows and columns of patches before the spatial merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageGrid {
    pub t: usize,
    pub h: usize,
    pub w: usize,
}

impl ImageGrid {
    /// Patches the tower embeds.
    pub fn patches(&self) -> usize {
        self.t * self.h * self.w
    }
}

/// How a model lays images into its prompt: each image is a run of `image_token_id`
/// placeholders, one per merged patch (`spatial_merge_size`² patches each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLayout {
    pub image_token_id: i32,
    pub spatial_merge_size: usize,
}

impl ImageLayout {
    /// Placeholder tokens of an image (its grid checked against the merge).
    pub fn tokens(&self, g: &ImageGrid) -> Result<usize> {
        let m = self.spatial_merge_size;
        ensure!(g.t > 0 && g.h > 0 && g.w > 0, "image grid {g:?} is empty");
        ensure!(g.h % m == 0 && g.w % m == 0, "image grid {g:?} is not a multiple of spatial_merge_size {m}");
        Ok(g.t * (g.h / m) * (g.w / m))
    }
}

/// A prompt's M-RoPE positions, as transformers' `get_rope_index` (Qwen2-VL): text tokens count
/// up by one on all three rows; an image's placeholders starting at `p` get (p + frame, p + row,
/// p + column) of its merged grid, and the text after it continues at p + max(rows, columns).
/// Tokens past the prompt (decoding) are at their index + `delta` on all rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MropePositions {
    pub prompt: Vec<[i32; 3]>,
    pub delta: i32,
    /// Prompt index of every placeholder, in order (image after image).
    pub placeholders: Vec<usize>,
}

impl MropePositions {
    pub fn new(layout: &ImageLayout, prompt: &[i32], grids: &[ImageGrid]) -> Result<Self> {
        let m = layout.spatial_merge_size;
        let mut positions = Vec::with_capacity(prompt.len());
        let mut placeholders = Vec::new();
        let mut images = grids.iter().enumerate();
        let (mut i, mut cur) = (0usize, 0i32);
        while i < prompt.len() {
            if prompt[i] != layout.image_token_id {
                positions.push([cur; 3]);
                cur += 1;
                i += 1;
                continue;
            }
            let Some((k, g)) = images.next() else {
                bail!("prompt has an image placeholder at {i} beyond its {} images", grids.len());
            };
            let n = layout.tokens(g)?;
            let run = prompt[i..].iter().take_while(|&&t| t == layout.image_token_id).count();
            ensure!(run >= n, "image {k} (grid {g:?}) needs {n} placeholders, the prompt has {run} at {i}");
            let (gh, gw) = (g.h / m, g.w / m);
            for f in 0..g.t {
                for r in 0..gh {
                    for c in 0..gw {
                        positions.push([cur + f as i32, cur + r as i32, cur + c as i32]);
                    }
                }
            }
            placeholders.extend(i..i + n);
            cur += gh.max(gw) as i32;
            i += n;
        }
        let left = images.count();
        ensure!(left == 0, "{left} of {} images have no placeholders in the prompt", grids.len());
        let max = positions.iter().flat_map(|p| p.iter().copied()).max().unwrap_or(-1);
        Ok(Self { delta: max + 1 - prompt.len() as i32, prompt: positions, placeholders })
    }

    /// (t, h, w) of the token at index `p` of the request.
    pub fn at(&self, p: usize) -> [i32; 3] {
        self.prompt.get(p).copied().unwrap_or([p as i32 + self.delta; 3])
    }
}

/// One request's images, ready for every step of it.
#[derive(Debug)]
pub struct RequestImages {
    pub positions: MropePositions,
    /// `[placeholders, hidden]`: the tower's rows, in placeholder order.
    pub embeds: Array,
}

impl RequestImages {
    pub fn new(positions: MropePositions, embeds: Array) -> Result<Self> {
        let rows = embeds.shape().first().copied().unwrap_or(0) as usize;
        ensure!(
            rows == positions.placeholders.len(),
            "the vision tower gave {rows} rows for {} placeholder tokens",
            positions.placeholders.len()
        );
        Ok(Self { positions, embeds })
    }

    /// The rows whose placeholders lie in `[start, end)`.
    pub fn rows_in(&self, start: usize, end: usize) -> std::ops::Range<usize> {
        let p = &self.positions.placeholders;
        p.partition_point(|&x| x < start)..p.partition_point(|&x| x < end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: ImageLayout = ImageLayout { image_token_id: 9, spatial_merge_size: 2 };

    #[test]
    fn positions_follow_get_rope_index() {
        // text, a 2 x 3 merged image (grid 4 x 6), text.
        let prompt = [1, 2, 9, 9, 9, 9, 9, 9, 3];
        let p = MropePositions::new(&L, &prompt, &[ImageGrid { t: 1, h: 4, w: 6 }]).unwrap();
        let want = [[0, 0, 0], [1, 1, 1], [2, 2, 2], [2, 2, 3], [2, 2, 4], [2, 3, 2], [2, 3, 3], [2, 3, 4], [5, 5, 5]];
        assert_eq!(p.prompt, want);
        assert_eq!(p.placeholders, (2..8).collect::<Vec<_>>());
        // max 5, 9 tokens: decoding continues at index - 3.
        assert_eq!(p.delta, -3);
        assert_eq!(p.at(9), [6; 3]);
    }

    #[test]
    fn text_only_is_plain_positions() {
        let p = MropePositions::new(&L, &[4, 5, 6], &[]).unwrap();
        assert_eq!(p.prompt, [[0; 3], [1; 3], [2; 3]]);
        assert_eq!((p.delta, p.at(7)), (0, [7; 3]));
    }

    #[test]
    fn placeholder_counts_must_match() {
        let g = ImageGrid { t: 1, h: 2, w: 2 };
        let e = MropePositions::new(&L, &[1, 9, 9], &[g]).unwrap_err().to_string();
        assert!(e.contains("needs 1 placeholders") || e.contains("beyond"), "{e}");
        let e = MropePositions::new(&L, &[1, 2], &[g]).unwrap_err().to_string();
        assert!(e.contains("1 of 1 images have no placeholders"), "{e}");
        let e = MropePositions::new(&L, &[9], &[ImageGrid { t: 1, h: 3, w: 2 }]).unwrap_err().to_string();
        assert!(e.contains("not a multiple"), "{e}");
    }
}
