//! Deterministic inputs for the tests and benchmarks of this workspace (xorshift, so none of them
//! needs a random-number crate, and the same seed gives the same values everywhere).

/// `n` values in [-a, a] from `seed`.
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
