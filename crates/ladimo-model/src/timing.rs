//! Medians of timings: what every measured speed and latency in ladimo reports.

use std::time::Instant;

/// The median of `v` (the upper of the two middle values for an even count; NaN for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median seconds of `f` over `repeats` runs (at least one) after one warm-up run.
pub fn median_seconds<E>(repeats: usize, mut f: impl FnMut() -> Result<(), E>) -> Result<f64, E> {
    f()?;
    let mut t = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_the_middle_value() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(vec![]).is_nan());
        let mut runs = 0;
        median_seconds::<()>(2, || {
            runs += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(runs, 3, "one warm-up and two timed runs");
    }
}
