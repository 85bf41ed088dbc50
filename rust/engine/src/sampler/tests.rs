use mlx_rs::{ops, Array, Dtype};

use super::choose::{filter_sorted, gumbel_argmax_of, top_candidates, Filter};
use super::processors::penalise;
use super::*;

fn probs_logits() -> Array {
    // Two identical rows over 6 tokens with probabilities .4 .25 .15 .1 .06 .04
    let p = [0.4f32, 0.25, 0.15, 0.1, 0.06, 0.04];
    let l: Vec<f32> = p.iter().chain(p.iter()).map(|x| x.ln()).collect();
    Array::from_slice(&l, &[2, 6])
}

fn row(params: &SamplingParams, key: u64) -> Row<'_> {
    Row { params, key, prompt: &[], output: &[], counts: None }
}

fn draw(params: &SamplingParams, n: u64) -> Vec<usize> {
    let logits = probs_logits();
    let mut counts = vec![0usize; 6];
    for i in 0..n {
        let rows = [row(params, mix_seed(7, 2 * i)), row(params, mix_seed(7, 2 * i + 1))];
        let t: Vec<i32> = sample(&logits, &rows).unwrap().as_slice::<i32>().to_vec();
        for x in t {
            counts[x as usize] += 1;
        }
    }
    counts
}

#[test]
fn greedy_is_argmax() {
    let p = SamplingParams::default();
    let out = sample(&probs_logits(), &[row(&p, 0), row(&p, 1)]).unwrap();
    assert_eq!(out.as_slice::<i32>(), &[0, 0]);
}

#[test]
fn top_k_and_top_p_never_pick_filtered_tokens() {
    let k2 = SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() };
    let c = draw(&k2, 300);
    assert!(c[2..].iter().all(|&x| x == 0), "top_k=2 drew {c:?}");
    assert!(c[0] > c[1] && c[1] > 0, "top_k=2 draws {c:?}");
    // top_p 0.7: .4 + .25 = .65 < .7, so the third token (.15) is still needed; the 4th is not.
    let p = SamplingParams { temperature: 1.0, top_p: 0.7, ..Default::default() };
    let c = draw(&p, 300);
    assert!(c[3..].iter().all(|&x| x == 0), "top_p=0.7 drew {c:?}");
    assert!(c[2] > 0, "top_p=0.7 should keep the third token: {c:?}");
}

#[test]
fn seeded_draws_repeat() {
    let p = SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() };
    assert_eq!(draw(&p, 20), draw(&p, 20));
}

#[test]
fn gather_logprobs_puts_the_target_first_then_the_top_k() {
    let scores = Array::from_slice(&[0.1f32, 0.5, 0.3, 0.7, -1.0, 0.5, 0.2, 0.0], &[2, 4]);
    let targets = Array::from_slice(&[2i32, 3], &[2]);
    let t = gather_logprobs(&scores, 2, &targets).unwrap();
    assert_eq!(t.token_ids.as_slice::<i32>(), &[2, 3, 1, 3, 1, 2]);
    assert_eq!(t.scores.as_slice::<f32>(), &[0.3, 0.7, 0.5, 0.0, 0.5, 0.2]);
    // Rank: tokens scoring at least as high as the target, itself included.
    assert_eq!(t.ranks.as_slice::<i32>(), &[3, 3]);
    let all = gather_logprobs(&scores, -1, &targets).unwrap();
    assert_eq!(all.token_ids.shape(), &[2, 5]);
}

#[test]
fn log_softmax_rows_sum_to_one() {
    let x = Array::from_slice(&[1.0f32, 2.0, 3.0, -50.0, 0.0, 50.0], &[2, 3]);
    let p = log_softmax(&x).unwrap().exp().unwrap().sum_axis(1, false).unwrap();
    for s in p.as_slice::<f32>() {
        assert!((s - 1.0).abs() < 1e-6, "{s}");
    }
}

#[test]
fn bitmask_bans_unset_bits() {
    // Token t is allowed when bit t % 32 of word t / 32 is set; 40 tokens, two words.
    let words = [0b1010i32, 1 << 7]; // tokens 1, 3 and 39
    let add = bitmask_to_additive(2, 40, &[(1, &words[..])]).unwrap();
    let a = add.as_slice::<f32>();
    assert!(a[..40].iter().all(|&x| x == 0.0), "row 0 has no mask");
    let allowed: Vec<usize> = (0..40).filter(|&t| a[40 + t] == 0.0).collect();
    assert_eq!(allowed, vec![1, 3, 39]);
    assert!(bitmask_to_additive(1, 70, &[(0, &words[..])]).is_err(), "too short a mask");
}

#[test]
fn top_k_rows_draw_the_same_over_candidates_or_the_whole_vocabulary() {
    // Rows with a top-k draw over candidates; adding a row without one adds the
    // whole-vocabulary path to the batch. The top-k rows must not notice.
    let v = 50;
    let l: Vec<f32> = (0..3 * v).map(|i| ((i * 37 % 101) as f32) / 17.0).collect();
    let logits = Array::from_slice(&l, &[3, v as i32]);
    let k5 = SamplingParams { temperature: 1.0, top_k: 5, top_p: 0.8, min_p: 0.05, ..Default::default() };
    let free = SamplingParams { temperature: 1.0, ..Default::default() };
    for key in 0..40u64 {
        let cand = sample(&logits, &[row(&k5, key), row(&k5, key + 1000), row(&k5, key + 2000)]).unwrap();
        let full = sample(&logits, &[row(&k5, key), row(&k5, key + 1000), row(&free, key + 2000)]).unwrap();
        assert_eq!(cand.as_slice::<i32>()[..2], full.as_slice::<i32>()[..2], "key {key}");
    }
}

#[test]
fn top_candidates_are_the_k_best_through_blocks_or_not() {
    // 1000 tokens: k = 5 goes through the block search, k = 40 partitions the whole row.
    let v = 1000;
    let l: Vec<f32> = (0..2 * v).map(|i| ((i as u64 * 7919 % 10007) as f32).sin() * 10.0).collect();
    let x = Array::from_slice(&l, &[2, v as i32]);
    for k in [5, 40] {
        let got = top_candidates(&x, k).unwrap();
        for r in 0..2 {
            let row = &l[r * v..(r + 1) * v];
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let want: Vec<i32> = order[..k as usize].iter().map(|&t| t as i32).collect();
            assert_eq!(got.as_slice::<i32>()[r * k as usize..(r + 1) * k as usize], want[..], "k {k} row {r}");
        }
    }
}

#[test]
fn token_counts_grow_like_a_fresh_count() {
    let prompt = [5, 7, 5, 9];
    let output = [7, 7, 11, 5, 11];
    let mut grown = TokenCounts::default();
    for n in 0..=output.len() {
        grown.update(&prompt, &output[..n]);
    }
    let fresh = TokenCounts::of(&prompt, &output);
    let view = |c: &TokenCounts| {
        let mut e: Vec<(i32, f32, bool)> = (0..c.len()).map(|i| (c.tokens[i], c.in_output[i], c.in_prompt[i])).collect();
        e.sort_by_key(|t| t.0);
        e
    };
    assert_eq!(view(&grown), view(&fresh));
    assert_eq!(view(&fresh), vec![(5, 1.0, true), (7, 2.0, true), (9, 0.0, true), (11, 2.0, false)]);
}

#[test]
fn compiled_chains_equal_the_plain_ops_for_any_shape() {
    // Compiled here on the CPU backend; the engine compiles them on GPUs only.
    use crate::mlx_ext::fuse::compiled;
    let mut gumbel_c = compiled(gumbel_argmax_of);
    let mut filter_c = compiled(filter_sorted);
    let mut penalise_c = compiled(penalise);
    let vals = |r: i32, k: i32, m: i32| Array::from_iter((0..r * k).map(|i| ((i * m % 97) as f32 / 9.0).sin() * 4.0), &[r, k]);
    // (rows, ids per row, ids shared by all rows): every shape the sampler passes.
    for (r, k, shared) in [(3, 5, false), (1, 40, false), (4, 9, true), (7, 32, false), (2, 3, true)] {
        let key = Array::from_slice(&(0..r as u64).map(|i| mix_seed(i, 1) | 1).collect::<Vec<_>>(), &[r, 1]);
        let n = if shared { 1 } else { r };
        let ids = Array::from_iter((0..n * k).map(|i| i * 7 % 1000), &[n, k]);
        let args = [vals(r, k, 13), key, ids];
        let plain = gumbel_argmax_of(&args).unwrap();
        let fused = gumbel_c(&args).unwrap().remove(0);
        assert_eq!(plain.as_slice::<u32>(), fused.as_slice::<u32>(), "gumbel {r}x{k} shared {shared}");

        let sorted = ops::sort_axis(vals(r, k, 13).negative().unwrap(), 1).unwrap().negative().unwrap();
        let filters: Vec<Filter> = (0..r)
            .map(|i| Filter { temperature: 0.5 + i as f32, min_p: [0.0, 0.1][i as usize % 2], top_k: 2 + i, top_p: [1.0, 0.7, 0.9][i as usize % 3] })
            .collect();
        let [t, m, kk, p] = Filter::columns(&filters, k);
        let args = [sorted, Array::from_iter(0..k, &[1, k]), t, m, kk, p];
        let plain = filter_sorted(&args).unwrap();
        let fused = filter_c(&args).unwrap().remove(0);
        assert_eq!(plain.as_slice::<f32>(), fused.as_slice::<f32>(), "filter {r}x{k}");

        let col = |c: f32| Array::from_iter((0..r).map(|i| c + i as f32 / 10.0), &[r, 1]);
        let seen = vals(r, k, 11).gt(Array::from_f32(0.0)).unwrap().as_dtype(Dtype::Float32).unwrap();
        let args = [vals(r, k, 5), vals(r, k, 3).abs().unwrap().floor().unwrap(), seen, col(1.3), col(0.4), col(-0.2)];
        let plain = penalise(&args).unwrap();
        let fused = penalise_c(&args).unwrap().remove(0);
        assert_eq!(plain.as_slice::<f32>(), fused.as_slice::<f32>(), "penalise {r}x{k}");
    }
}
