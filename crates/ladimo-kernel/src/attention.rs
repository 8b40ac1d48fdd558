//! One query head's attention over a host KV cache: `out = softmax(scale * K q) V`.
//!
//! At decode the scores and the weighted sum are short vectors (one head's 64 dimensions) over a
//! few hundred cached positions, so the cost is in calls, not flops: the weighted sum adds eight
//! value rows per pass over `out` ([`simd::axpy_rows`]), which loads and stores `out` once per
//! eight positions instead of once per position.

use crate::Isa;
use crate::simd;

/// Positions added to `out` per pass.
const ROWS: usize = 8;

/// `out = softmax(scale * [k_p . q]_p) . [v_p]_p` over the positions `p < seen`, where `k_p` and
/// `v_p` are `keys[p * stride + off..][..q.len()]` and the same slice of `values` (the cache's
/// `[positions, kv_heads * head_dim]` rows, `off` picking the head). `scores` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    isa: Isa,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    off: usize,
    seen: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = q.len();
    assert_eq!(out.len(), d, "attend: out and q differ in length");
    assert!(seen > 0, "attend: no positions");
    let row = |m: &[f32], p: usize| -> std::ops::Range<usize> {
        let s = p * stride + off;
        assert!(s + d <= m.len(), "attend: position {p} is beyond the cache");
        s..s + d
    };
    scores.clear();
    scores.extend((0..seen).map(|p| simd::dot(isa, &keys[row(keys, p)], q) * scale));
    let m = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f32;
    for v in scores.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    out.fill(0.0);
    let mut p = 0;
    while p + ROWS <= seen {
        let a: [f32; ROWS] = std::array::from_fn(|k| scores[p + k] * inv);
        let w: [&[f32]; ROWS] = std::array::from_fn(|k| &values[row(values, p + k)]);
        simd::axpy_rows(isa, a, w, out);
        p += ROWS;
    }
    for p in p..seen {
        simd::axpy(isa, scores[p] * inv, &values[row(values, p)], out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain formula, in f64.
    fn reference(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        stride: usize,
        off: usize,
        seen: usize,
        scale: f32,
    ) -> Vec<f64> {
        let d = q.len();
        let s: Vec<f64> = (0..seen)
            .map(|p| {
                (0..d)
                    .map(|i| keys[p * stride + off + i] as f64 * q[i] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..d)
            .map(|i| (0..seen).map(|p| e[p] / z * values[p * stride + off + i] as f64).sum())
            .collect()
    }

    #[test]
    fn attend_equals_the_formula_for_every_isa_and_length() {
        let (d, heads) = (64, 3);
        let stride = d * heads;
        let mut x = 7u32;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 2000) as f32 / 1000.0 - 1.0
        };
        let keys: Vec<f32> = (0..stride * 40).map(|_| rnd()).collect();
        let values: Vec<f32> = (0..stride * 40).map(|_| rnd()).collect();
        let q: Vec<f32> = (0..d).map(|_| rnd() * 3.0).collect();
        let mut scores = Vec::new();
        for isa in Isa::available() {
            for seen in [1, 7, 8, 9, 17, 40] {
                for head in 0..heads {
                    let want = reference(&q, &keys, &values, stride, head * d, seen, 0.125);
                    let mut out = vec![1f32; d];
                    attend(
                        isa,
                        &q,
                        &keys,
                        &values,
                        stride,
                        head * d,
                        seen,
                        0.125,
                        &mut scores,
                        &mut out,
                    );
                    for (o, w) in out.iter().zip(&want) {
                        assert!((*o as f64 - w).abs() < 1e-5, "{isa:?} seen {seen}: {o} vs {w}");
                    }
                }
            }
        }
    }
}
