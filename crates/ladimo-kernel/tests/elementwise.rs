//! The one-pass elementwise kernels against plain f64 loops: `exp` over its range, SwiGLU with
//! each cut, thresholds, on every instruction set this CPU has and lengths that are not a
//! multiple of any vector width or of the parallel chunk.

use ladimo_kernel::testdata::uniform;

use ladimo_kernel::Isa;
use ladimo_kernel::elementwise::{Cut, exp, swiglu, threshold};

fn silu64(v: f32) -> f64 {
    let v = v as f64;
    v / (1.0 + (-v).exp())
}

#[test]
fn exp_is_within_2e7_relative_over_its_range() {
    let mut worst = 0f64;
    for i in 0..=200_000 {
        let v = -87.0 + 175.0 * i as f32 / 200_000.0;
        let want = (v as f64).exp();
        worst = worst.max(((exp(v) as f64 - want) / want).abs());
    }
    assert!(worst < 2e-7, "worst relative error {worst:e}");
    // Clamped, not infinite or NaN, outside the range; exp(0) exact.
    assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
    assert!(exp(1000.0).is_finite());
    assert_eq!(exp(0.0), 1.0);
    // silu's use: a large negative gate gives -0-ish, not NaN.
    assert!((-1000.0f32 / (1.0 + exp(1000.0))).abs() < 1e-30);
}

#[test]
fn swiglu_matches_a_plain_loop_for_every_cut_and_isa() {
    // 3 chunks of the parallel split and a ragged tail.
    let n = 3 * (1 << 14) + 37;
    let g = uniform(n, 8.0, 1);
    let u0 = uniform(n, 2.0, 2);
    for isa in Isa::available() {
        for cut in [Cut::None, Cut::H(0.3), Cut::Gate(0.2), Cut::H(0.0)] {
            let mut u = u0.clone();
            let kept = swiglu(isa, &g, &mut u, cut);
            let mut want_kept = 0;
            for i in 0..n {
                let a = silu64(g[i]);
                let h = a * u0[i] as f64;
                let keep = match cut {
                    Cut::None => true,
                    Cut::H(t) => h.abs() >= t as f64,
                    Cut::Gate(t) => a.abs() >= t as f64,
                };
                want_kept += keep as usize;
                let want = if keep { h } else { 0.0 };
                // Near a cut a 1e-7 difference may flip the decision: then both sides are small.
                let near = match cut {
                    Cut::H(t) => (h.abs() - t as f64).abs() < 1e-5,
                    Cut::Gate(t) => (a.abs() - t as f64).abs() < 1e-5,
                    Cut::None => false,
                };
                if !near {
                    let err = (u[i] as f64 - want).abs() / want.abs().max(1e-3);
                    assert!(err < 1e-5, "{isa:?} {cut:?} at {i}: {} vs {want}", u[i]);
                }
            }
            assert!(
                kept.abs_diff(want_kept) <= 2,
                "{isa:?} {cut:?}: kept {kept}, want {want_kept}"
            );
            if cut == Cut::None || cut == Cut::H(0.0) {
                assert_eq!(kept, n, "{isa:?} {cut:?} keeps everything");
            }
        }
    }
}

#[test]
fn threshold_zeroes_exactly_the_small_entries() {
    let n = 2 * (1 << 14) + 5;
    let x0 = uniform(n, 1.0, 3);
    for isa in Isa::available() {
        let mut x = x0.clone();
        let kept = threshold(isa, &mut x, 0.4);
        let want: Vec<f32> = x0.iter().map(|&v| if v.abs() >= 0.4 { v } else { 0.0 }).collect();
        assert_eq!(x, want, "{isa:?}");
        assert_eq!(kept, x0.iter().filter(|v| v.abs() >= 0.4).count(), "{isa:?}");
        // Threshold 0 keeps everything, including zeros.
        let mut z = vec![0.0, 1.0, -2.0];
        assert_eq!(threshold(isa, &mut z, 0.0), 3);
    }
}
