//! The predictor router's closed-form fit: its reported loss is its own error on the data, falls
//! with the rank, matches plain least squares at full rank, and on the tiny model's real FFN
//! inputs beats the constant predictor; its targets are the experts' true output norms.

mod common;

use ladimo_distill::predictor::{EPS, ExpertCut, PredictorStats, collect_stats, predict, rows_tensor};
use ladimo_model::util::to_vec;
use ladimo_moe::HostFfn;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// `n` tokens of `x` `[n, h]` and `y = A x + b + noise` `[n, e]` with `A` of rank `true_rank`.
fn synthetic(n: usize, h: usize, e: usize, true_rank: usize, noise: f32) -> (Vec<f32>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut g = |s: f32| (rng.random::<f32>() * 2.0 - 1.0) * s;
    let u: Vec<f32> = (0..e * true_rank).map(|_| g(1.0)).collect();
    let v: Vec<f32> = (0..true_rank * h).map(|_| g(1.0)).collect();
    let b: Vec<f32> = (0..e).map(|_| g(2.0)).collect();
    let x: Vec<f32> = (0..n * h).map(|_| g(1.0) + 0.3).collect();
    let mut y = vec![0f32; n * e];
    for t in 0..n {
        let z: Vec<f32> = (0..true_rank)
            .map(|k| (0..h).map(|c| v[k * h + c] * x[t * h + c]).sum())
            .collect();
        for i in 0..e {
            y[t * e + i] = b[i] + (0..true_rank).map(|k| u[i * true_rank + k] * z[k]).sum::<f32>() + g(noise);
        }
    }
    (x, y)
}

fn stats_of(x: &[f32], y: &[f32], n: usize, h: usize, e: usize) -> PredictorStats {
    let device = ladimo_backend::device();
    let mut s = PredictorStats::new(h, e);
    // In uneven chunks, as windows arrive.
    let mut t = 0;
    for chunk in [37, 100, n] {
        let m = chunk.min(n - t);
        if m == 0 {
            break;
        }
        s.add(
            rows_tensor(x[t * h..(t + m) * h].to_vec(), m, h, &device),
            rows_tensor(y[t * e..(t + m) * e].to_vec(), m, e, &device),
        );
        t += m;
    }
    assert_eq!(s.tokens, n);
    s
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>() / a.len() as f64
}

/// Ordinary least squares of every column of `y` on `[x, 1]`, by the normal equations solved by
/// Gaussian elimination in f64: a route that shares nothing with the fit under test.
fn least_squares_mse(x: &[f32], y: &[f32], n: usize, h: usize, e: usize) -> f64 {
    let d = h + 1;
    let row = |t: usize| -> Vec<f64> { x[t * h..(t + 1) * h].iter().map(|&v| v as f64).chain([1.0]).collect() };
    let mut a = vec![0f64; d * d];
    let mut b = vec![0f64; d * e];
    for t in 0..n {
        let r = row(t);
        for i in 0..d {
            for j in 0..d {
                a[i * d + j] += r[i] * r[j];
            }
            for k in 0..e {
                b[i * e + k] += r[i] * y[t * e + k] as f64;
            }
        }
    }
    // Gauss-Jordan with partial pivoting on [a | b].
    for c in 0..d {
        let p = (c..d)
            .max_by(|&i, &j| a[i * d + c].abs().total_cmp(&a[j * d + c].abs()))
            .unwrap();
        for j in 0..d {
            a.swap(c * d + j, p * d + j);
        }
        for k in 0..e {
            b.swap(c * e + k, p * e + k);
        }
        let piv = a[c * d + c];
        for i in 0..d {
            if i != c {
                let f = a[i * d + c] / piv;
                for j in 0..d {
                    a[i * d + j] -= f * a[c * d + j];
                }
                for k in 0..e {
                    b[i * e + k] -= f * b[c * e + k];
                }
            }
        }
    }
    let mut err = 0.0;
    for t in 0..n {
        let r = row(t);
        for k in 0..e {
            let p: f64 = (0..d).map(|i| r[i] * b[i * e + k] / a[i * d + i]).sum();
            err += (p - y[t * e + k] as f64).powi(2);
        }
    }
    err / (n * e) as f64
}

#[test]
fn the_fit_is_its_own_error_falls_with_rank_and_is_least_squares_at_full_rank() {
    let (n, h, e, true_rank) = (400, 12, 20, 3);
    let (x, y) = synthetic(n, h, e, true_rank, 0.1);
    let solved = stats_of(&x, &y, n, h, e).solve().unwrap();
    let mut last = f64::INFINITY;
    for r in 1..=h {
        let fit = solved.at_rank(r).unwrap();
        assert_eq!(fit.down.shape, [r, h]);
        assert_eq!(fit.up.shape, [e, r]);
        let own = mse(&predict(&fit, &x, n), &y);
        assert!(
            (fit.loss - own).abs() <= 1e-4 * own.max(1e-6),
            "rank {r}: reported loss {} but the predictor's own error is {own}",
            fit.loss
        );
        assert!(
            fit.loss <= last * (1.0 + 1e-9),
            "rank {r}: loss {} rose from {last}",
            fit.loss
        );
        assert!(fit.loss < fit.constant_loss, "rank {r}: no better than a constant");
        last = fit.loss;
        if r == true_rank {
            // Noise uniform in ±0.1 has variance 0.01 / 3; the fit also sees a little of it.
            assert!(fit.loss < 0.0040, "rank {r} = the true rank: loss {}", fit.loss);
        }
        if r == true_rank - 1 {
            assert!(fit.loss > 0.05, "rank {r} < the true rank should not fit: {}", fit.loss);
        }
    }
    let ols = least_squares_mse(&x, &y, n, h, e);
    assert!(
        (last - ols).abs() <= 1e-3 * ols,
        "full rank {last} against least squares {ols}"
    );
    let err = solved.at_rank(h + 1).unwrap_err().to_string();
    assert!(err.contains("predictor rank 13"), "{err}");
    assert!(solved.at_rank(0).is_err());
}

#[test]
fn on_the_tiny_model_the_fit_loss_falls_and_the_targets_are_the_experts_output_norms() {
    let (ckpt, mut model, tokens) = common::tiny("tiny-llama3", 1024);
    let device = model.device.clone();
    let layers = model.layers.len();
    // 16 contiguous experts of 10 neurons in every layer.
    let experts_of = |l: usize| -> Vec<HostFfn> {
        let f = HostFfn::from_checkpoint(&ckpt, l).unwrap();
        (0..16)
            .map(|e| f.select_neurons(&(e * 10..e * 10 + 10).collect::<Vec<_>>()))
            .collect()
    };
    // The targets against each expert run on its own.
    let experts = experts_of(1);
    let cut = ExpertCut::new(&experts, &device);
    let x = rows_tensor(
        (0..5 * 64).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect(),
        5,
        64,
        &device,
    );
    let got = to_vec(cut.log_norms(x.clone()));
    for (i, f) in experts.iter().enumerate() {
        let y = to_vec(f.to_dense(&device).forward_any(x.clone()));
        for t in 0..5 {
            let norm = y[t * 64..(t + 1) * 64].iter().map(|v| v * v).sum::<f32>().sqrt();
            let want = (norm + EPS).ln();
            assert!((got[t * 16 + i] - want).abs() < 1e-4, "expert {i}, token {t}");
        }
    }
    // Single neurons take the shortcut |h_j| ||down_j||; check it against the same rule.
    let singles: Vec<HostFfn> = (0..160)
        .map(|j| experts_of(0)[j / 10].select_neurons(&[j % 10]))
        .collect();
    let got = to_vec(ExpertCut::new(&singles, &device).log_norms(x.clone()));
    for (j, f) in singles.iter().enumerate().step_by(13) {
        let y = to_vec(f.to_dense(&device).forward_any(x.clone()));
        let norm = y[..64].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((got[j] - (norm + EPS).ln()).abs() < 1e-4, "neuron {j}");
    }

    let windows: Vec<&[u32]> = tokens.chunks(128).collect();
    let cuts = (0..layers).map(|l| ExpertCut::new(&experts_of(l), &device)).collect();
    let stats = collect_stats(&mut model, cuts, &windows, |_, _| {}).unwrap();
    assert!(
        model.layers[0].ffn.describe().contains("dense"),
        "the model is put back"
    );
    for (l, s) in stats.iter().enumerate() {
        assert_eq!(s.tokens, 1024);
        let solved = s.solve().unwrap();
        let losses: Vec<f64> = [1, 2, 4, 8, 16]
            .iter()
            .map(|&r| solved.at_rank(r).unwrap().loss)
            .collect();
        let constant = solved.at_rank(1).unwrap().constant_loss;
        assert!(
            losses[0] < constant,
            "layer {l}: rank 1 {} vs constant {constant}",
            losses[0]
        );
        assert!(
            losses.windows(2).all(|w| w[1] <= w[0] * (1.0 + 1e-9)),
            "layer {l}: {losses:?}"
        );
        assert!(
            losses[4] < 0.9 * losses[0],
            "layer {l}: the rank buys little: {losses:?}"
        );
    }
    // A predictor rank above the hidden size is refused, naming the setting.
    let err = stats[0].solve().unwrap().at_rank(65).unwrap_err().to_string();
    assert!(
        err.contains("predictor rank 65") && err.contains("hidden size 64"),
        "{err}"
    );
}
