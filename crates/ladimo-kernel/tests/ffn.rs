//! The kernels against a plain f64 loop: every selection, expert sizes 1 to 64, 1, 2 and 7 tokens,
//! every weight type, every instruction set this CPU has.

use ladimo_kernel::testdata::uniform;

use std::ops::Range;

use ladimo_kernel::simd::{axpy, axpy_rows, dot};
use ladimo_kernel::{Dtype, FfnKernel, Isa, Matrix, Selection, silu};

const HIDDEN: usize = 96;
const INTER: usize = 192;

struct Weights {
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
    hd: usize,
    f: usize,
}

fn weights(dtype: Dtype) -> Weights {
    weights_of(dtype, HIDDEN, INTER)
}

/// Weights of an FFN of `hd` inputs and `f` neurons, rounded to `dtype`.
fn weights_of(dtype: Dtype, hd: usize, f: usize) -> Weights {
    let r = |v: Vec<f32>| v.into_iter().map(|x| dtype.round(x)).collect();
    Weights {
        gate: r(uniform(f * hd, 0.3, 1)),
        up: r(uniform(f * hd, 0.3, 2)),
        down: r(uniform(f * hd, 0.3, 3)),
        hd,
        f,
    }
}

/// The FFN of one token in f64: per neuron, its activation and the weight its output gets
/// (0: not kept).
fn reference(w: &Weights, x: &[f32], sel: &Selection, t: usize) -> Vec<f64> {
    let (hidden, inter) = (w.hd, w.f);
    let x: Vec<f64> = match sel {
        Selection::Teal { x: tx, .. } | Selection::TealBlocks { x: tx, .. } => {
            x.iter().map(|&v| if v.abs() >= *tx { v as f64 } else { 0.0 }).collect()
        }
        _ => x.iter().map(|&v| v as f64).collect(),
    };
    let row = |m: &[f32], j: usize| -> f64 { (0..hidden).map(|i| m[j * hidden + i] as f64 * x[i]).sum() };
    let mut scale = vec![0f64; inter];
    match sel {
        Selection::All | Selection::Cats { .. } | Selection::Teal { .. } => scale.fill(1.0),
        Selection::Neurons(k) => k.iter().for_each(|&j| scale[j as usize] = 1.0),
        Selection::Blocks(b) | Selection::TealBlocks { blocks: b, .. } => {
            for (r, wt) in &b[t] {
                r.clone().for_each(|j| scale[j] += *wt as f64);
            }
        }
    }
    let mut y = vec![0f64; hidden];
    for (j, &s_j) in scale.iter().enumerate() {
        if s_j == 0.0 {
            continue;
        }
        let g = row(&w.gate, j);
        let a = g / (1.0 + (-g).exp());
        let h = a * row(&w.up, j);
        let keep = match sel {
            Selection::Cats { gate } => a.abs() >= *gate as f64,
            Selection::Teal { h: th, .. } | Selection::TealBlocks { h: th, .. } => h.abs() >= *th as f64,
            _ => true,
        };
        if keep {
            for (o, yo) in y.iter_mut().enumerate() {
                *yo += s_j * h * w.down[o * inter + j] as f64;
            }
        }
    }
    y
}

/// max |got - want| / max |want| over the tokens.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Per token, experts of `size` neurons: every other expert (offset by the token), weights 0.5..1.
fn routes(size: usize, n: usize) -> Vec<Vec<(Range<usize>, f32)>> {
    routes_of(INTER, size, n)
}

fn routes_of(inter: usize, size: usize, n: usize) -> Vec<Vec<(Range<usize>, f32)>> {
    let experts = inter / size;
    (0..n)
        .map(|t| {
            (0..experts)
                .filter(|e| (e + t) % 2 == 0)
                .map(|e| (e * size..(e + 1) * size, 0.5 + 0.5 * (e % 3) as f32 / 2.0))
                .collect()
        })
        .collect()
}

fn check(dtype: Dtype, sel: &Selection, n: usize, what: &str) -> f64 {
    check_shape(dtype, HIDDEN, INTER, sel, n, what)
}

fn check_shape(dtype: Dtype, hd: usize, f: usize, sel: &Selection, n: usize, what: &str) -> f64 {
    let w = weights_of(dtype, hd, f);
    let x = uniform(n * hd, 1.0, 7 + n as u64);
    let k = FfnKernel::new(&w.gate, &w.up, &w.down, hd, f, dtype, FfnKernel::layout_for(sel));
    let mut y = vec![0f32; n * hd];
    k.forward(&x, n, sel, &mut y);
    let want: Vec<f64> = (0..n)
        .flat_map(|t| reference(&w, &x[t * hd..(t + 1) * hd], sel, t))
        .collect();
    let e = rel_err(&y, &want);
    assert!(
        e <= 1e-5,
        "{what}, {dtype}, {hd}x{f}, {n} tokens: relative error {e:.2e} > 1e-5"
    );
    e
}

/// Sizes that are no multiple of any vector width or group: every loop's remainder runs (TEAL's
/// kept columns in groups of eight and a rest, rows shorter than a vector, odd thread splits).
#[test]
fn odd_sizes_match_the_f64_loop() {
    for (hd, f) in [(100, 203), (13, 37), (576, 67)] {
        let keep: Vec<u32> = (0..f as u32).filter(|j| j % 3 != 1).collect();
        for dtype in Dtype::ALL {
            for n in [1, 2, 7] {
                check_shape(dtype, hd, f, &Selection::All, n, "dense");
                check_shape(dtype, hd, f, &Selection::Neurons(&keep), n, "static");
                check_shape(dtype, hd, f, &Selection::Cats { gate: 0.05 }, n, "CATS");
                for tx in [0.0, 0.4, 0.9] {
                    check_shape(dtype, hd, f, &Selection::Teal { x: tx, h: 0.02 }, n, "TEAL");
                }
                for size in [1, 3, 16] {
                    let r = routes_of(f, size, n);
                    check_shape(dtype, hd, f, &Selection::Blocks(&r), n, &format!("experts of {size}"));
                    let sel = Selection::TealBlocks {
                        x: 0.4,
                        h: 0.02,
                        blocks: &r,
                    };
                    check_shape(dtype, hd, f, &sel, n, &format!("TEAL in experts of {size}"));
                }
            }
        }
    }
}

#[test]
fn every_selection_matches_the_f64_loop_on_the_same_weights() {
    let keep: Vec<u32> = (0..INTER as u32).filter(|j| j % 3 != 1).collect();
    for dtype in Dtype::ALL {
        for n in [1, 2, 7] {
            check(dtype, &Selection::All, n, "dense");
            check(dtype, &Selection::Neurons(&keep), n, "static");
            check(dtype, &Selection::Cats { gate: 0.05 }, n, "CATS");
            check(dtype, &Selection::Teal { x: 0.4, h: 0.02 }, n, "TEAL");
            for size in [1, 2, 3, 4, 8, 16, 32, 64] {
                let r = routes(size, n);
                check(dtype, &Selection::Blocks(&r), n, &format!("experts of {size}"));
                for (tx, th) in [(0.0, 0.0), (0.4, 0.02)] {
                    let sel = Selection::TealBlocks {
                        x: tx,
                        h: th,
                        blocks: &r,
                    };
                    check(dtype, &sel, n, &format!("TEAL {tx}/{th} in experts of {size}"));
                }
            }
        }
    }
}

#[test]
fn dense_on_the_input_major_layout_matches_too() {
    let w = weights(Dtype::F32);
    let x = uniform(2 * HIDDEN, 1.0, 11);
    let k = FfnKernel::new(
        &w.gate,
        &w.up,
        &w.down,
        HIDDEN,
        INTER,
        Dtype::F32,
        ladimo_kernel::GateUpLayout::InputMajor,
    );
    let mut y = vec![0f32; 2 * HIDDEN];
    let read = k.forward(&x, 2, &Selection::All, &mut y);
    assert_eq!(read, (2 * 3 * HIDDEN * INTER) as f64);
    let want: Vec<f64> = (0..2)
        .flat_map(|t| reference(&w, &x[t * HIDDEN..(t + 1) * HIDDEN], &Selection::All, t))
        .collect();
    assert!(rel_err(&y, &want) <= 1e-5);
}

/// 16-bit weights against the f64 loop on the f32 weights: the cost of the rounding, bounded.
#[test]
fn sixteen_bit_weights_stay_within_their_bound() {
    let exact = weights(Dtype::F32);
    for (dtype, bound) in [(Dtype::F16, 4e-3), (Dtype::Bf16, 3e-2)] {
        for n in [1, 2, 7] {
            let x = uniform(n * HIDDEN, 1.0, 7 + n as u64);
            let r = routes(4, n);
            for sel in [Selection::All, Selection::Blocks(&r)] {
                let k = FfnKernel::new(
                    &exact.gate,
                    &exact.up,
                    &exact.down,
                    HIDDEN,
                    INTER,
                    dtype,
                    FfnKernel::layout_for(&sel),
                );
                let mut y = vec![0f32; n * HIDDEN];
                k.forward(&x, n, &sel, &mut y);
                let want: Vec<f64> = (0..n)
                    .flat_map(|t| reference(&exact, &x[t * HIDDEN..(t + 1) * HIDDEN], &sel, t))
                    .collect();
                let e = rel_err(&y, &want);
                assert!(e <= bound, "{dtype}, {n} tokens: relative error {e:.2e} > {bound:.0e}");
                assert!(
                    e > 1e-6,
                    "{dtype}: an error of {e:.2e} means the weights were not rounded"
                );
            }
        }
    }
}

#[test]
fn the_parameters_read_follow_each_policy() {
    let w = weights(Dtype::F32);
    let x = uniform(HIDDEN, 1.0, 5);
    let mut y = vec![0f32; HIDDEN];
    let k = FfnKernel::new(
        &w.gate,
        &w.up,
        &w.down,
        HIDDEN,
        INTER,
        Dtype::F32,
        ladimo_kernel::GateUpLayout::NeuronMajor,
    );
    let r = routes(8, 1);
    let neurons: usize = r[0].iter().map(|(r, _)| r.len()).sum();
    assert_eq!(
        k.forward(&x, 1, &Selection::Blocks(&r), &mut y),
        (3 * HIDDEN * neurons) as f64
    );
    let cats = k.forward(&x, 1, &Selection::Cats { gate: 0.05 }, &mut y);
    assert!(
        cats > (HIDDEN * INTER) as f64 && cats < (3 * HIDDEN * INTER) as f64,
        "CATS read {cats}"
    );
    let t = FfnKernel::new(
        &w.gate,
        &w.up,
        &w.down,
        HIDDEN,
        INTER,
        Dtype::F32,
        ladimo_kernel::GateUpLayout::InputMajor,
    );
    let kept_x = x.iter().filter(|v| v.abs() >= 0.4).count();
    let teal = t.forward(&x, 1, &Selection::Teal { x: 0.4, h: 0.0 }, &mut y);
    assert_eq!(teal, (2 * INTER * kept_x + HIDDEN * INTER) as f64);
    // TEAL inside experts: gate and up read for the run neurons' kept inputs, down for every run
    // neuron (h threshold 0).
    let in_experts = Selection::TealBlocks {
        x: 0.4,
        h: 0.0,
        blocks: &r,
    };
    assert_eq!(
        t.forward(&x, 1, &in_experts, &mut y),
        (2 * neurons * kept_x + HIDDEN * neurons) as f64
    );
}

#[test]
fn every_instruction_set_agrees_with_the_scalar_loop() {
    let w = uniform(1000, 1.0, 3);
    let x = uniform(1000, 1.0, 4);
    for dtype in Dtype::ALL {
        let m = Matrix::new(1, 1000, &w, dtype);
        let wr: Vec<f32> = m.row(0);
        for len in [1, 7, 16, 33, 64, 100, 576, 1000] {
            let want: f64 = (0..len).map(|i| wr[i] as f64 * x[i] as f64).sum();
            let want_axpy: Vec<f64> = (0..len).map(|i| x[i] as f64 + 0.5 * wr[i] as f64).collect();
            for isa in Isa::available() {
                let got = match &m.weights {
                    ladimo_kernel::Weights::F32(v) => dot(isa, &v[..len], &x[..len]),
                    ladimo_kernel::Weights::F16(v) => dot(isa, &v[..len], &x[..len]),
                    ladimo_kernel::Weights::Bf16(v) => dot(isa, &v[..len], &x[..len]),
                };
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{isa:?} {dtype} dot of {len}: {got} vs {want}"
                );
                let mut y = x[..len].to_vec();
                match &m.weights {
                    ladimo_kernel::Weights::F32(v) => axpy(isa, 0.5, &v[..len], &mut y),
                    ladimo_kernel::Weights::F16(v) => axpy(isa, 0.5, &v[..len], &mut y),
                    ladimo_kernel::Weights::Bf16(v) => axpy(isa, 0.5, &v[..len], &mut y),
                }
                for (g, w) in y.iter().zip(&want_axpy) {
                    assert!((*g as f64 - w).abs() <= 1e-6, "{isa:?} {dtype} axpy of {len}");
                }
            }
        }
    }
}

#[test]
fn matvec_matches_the_f64_loop() {
    let (rows, cols) = (131, 96);
    let w = uniform(rows * cols, 1.0, 9);
    for dtype in Dtype::ALL {
        let m = Matrix::new(rows, cols, &w, dtype);
        for n in [1, 2, 7] {
            let x = uniform(n * cols, 1.0, 10 + n as u64);
            let mut y = vec![0f32; n * rows];
            m.matvec(&x, n, &mut y);
            let want: Vec<f64> = (0..n)
                .flat_map(|t| {
                    let (x, w) = (&x[t * cols..(t + 1) * cols], &w);
                    (0..rows).map(move |r| {
                        (0..cols)
                            .map(|c| dtype.round(w[r * cols + c]) as f64 * x[c] as f64)
                            .sum::<f64>()
                    })
                })
                .collect();
            assert!(rel_err(&y, &want) <= 1e-5, "{dtype}, {n} tokens");
        }
    }
    let _ = silu(0.0);
}

#[test]
fn grouped_axpy_agrees_with_the_f64_loop_on_every_instruction_set() {
    for dtype in Dtype::ALL {
        let m = Matrix::new(8, 1000, &uniform(8000, 1.0, 5), dtype);
        let a = uniform(8, 1.0, 6);
        for len in [1, 7, 16, 33, 100, 576, 1000] {
            let want: Vec<f64> = (0..len)
                .map(|i| 0.25 + (0..8).map(|k| a[k] as f64 * m.row(k)[i] as f64).sum::<f64>())
                .collect();
            let want1: Vec<f64> = (0..len).map(|i| 0.25 + a[0] as f64 * m.row(0)[i] as f64).collect();
            for isa in Isa::available() {
                let mut y = vec![0.25f32; len];
                let mut y1 = vec![0.25f32; len];
                macro_rules! run {
                    ($v:expr) => {{
                        let rows: [&[_]; 8] = std::array::from_fn(|k| &$v[k * 1000..k * 1000 + len]);
                        axpy_rows(isa, a[..8].try_into().unwrap(), rows, &mut y);
                        axpy_rows(isa, [a[0]], [rows[0]], &mut y1);
                    }};
                }
                match &m.weights {
                    ladimo_kernel::Weights::F32(v) => run!(v),
                    ladimo_kernel::Weights::F16(v) => run!(v),
                    ladimo_kernel::Weights::Bf16(v) => run!(v),
                }
                for (g, w) in y.iter().zip(&want).chain(y1.iter().zip(&want1)) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5,
                        "{isa:?} {dtype} axpy_rows of {len}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
