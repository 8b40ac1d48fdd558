//! Helpers shared by this crate's tests.

/// Deterministic values in [-a, a] (xorshift, so no test needs a random-number crate).
pub fn uniform(n: usize, a: f32, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
        })
        .collect()
}
