//! Microseconds per call of the decode kernels at SmolLM2-135M's sizes (hidden 576, inter 1536,
//! 30 layers' worth of weights cycled so they come from memory, not cache; each call timed, the
//! 10th percentile printed):
//! `cargo run --release -p ladimo-kernel --example kernel_speed [f32|f16|bf16] [name filter]`.

use std::time::Instant;

use ladimo_kernel::{Dtype, FfnKernel, GateUpLayout, Matrix, Selection};

fn main() {
    let dtype = match std::env::args().nth(1).as_deref() {
        Some("f32") => Dtype::F32,
        Some("bf16") => Dtype::Bf16,
        _ => Dtype::F16,
    };
    let (hd, f, layers) = (576usize, 1536usize, 30usize);
    let mut seed = 1u64;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect()
    };
    let x: Vec<f32> = rnd(hd).iter().map(|v| v * 20.0).collect();
    let mk = |layout, rnd: &mut dyn FnMut(usize) -> Vec<f32>| {
        (0..layers)
            .map(|_| FfnKernel::new(&rnd(f * hd), &rnd(f * hd), &rnd(f * hd), hd, f, dtype, layout))
            .collect::<Vec<_>>()
    };
    let nm = mk(GateUpLayout::NeuronMajor, &mut rnd);
    let im = mk(GateUpLayout::InputMajor, &mut rnd);
    let mats: Vec<Matrix> = (0..layers).map(|_| Matrix::new(f, hd, &rnd(f * hd), dtype)).collect();
    let mut y = vec![0f32; hd];
    // An optional second argument: run only the cases whose name contains it.
    let only = std::env::args().nth(2).unwrap_or_default();
    let time = |name: &str, run: &mut dyn FnMut(usize)| {
        if !name.contains(only.as_str()) {
            return;
        }
        for l in 0..layers {
            run(l);
        }
        // Each call timed alone (30 layers cycled, 30 sweeps), and the 10th percentile of those
        // times: on a machine shared with other jobs most calls are interrupted, some are not.
        let mut ts: Vec<f64> = (0..30)
            .flat_map(|_| {
                (0..layers)
                    .map(|l| {
                        let t = Instant::now();
                        run(l);
                        t.elapsed().as_secs_f64() * 1e6
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        ts.sort_by(f64::total_cmp);
        let us = ts[ts.len() / 10];
        println!("{dtype} {name:<28} {us:>8.1} us");
    };
    let mut yv = vec![0f32; f];
    time("matvec 1536x576", &mut |l| mats[l].matvec(&x, 1, &mut yv));
    time("ffn dense", &mut |l| {
        nm[l].forward(&x, 1, &Selection::All, &mut y);
    });
    // TEAL at about half the inputs.
    let mut xs = x.clone();
    let mut sorted: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    sorted.sort_by(f32::total_cmp);
    for (q, name) in [(0.25, "TEAL 75%"), (0.5, "TEAL 50%")] {
        let tx = sorted[(q * hd as f64) as usize];
        xs.copy_from_slice(&x);
        time(name, &mut |l| {
            im[l].forward(&xs, 1, &Selection::Teal { x: tx, h: 0.0 }, &mut y);
        });
    }
    for size in [1usize, 4, 16, 64] {
        for budget in [0.75, 0.5] {
            let experts = f / size;
            let keep = (budget * experts as f64) as usize;
            let routes = vec![
                (0..keep)
                    .map(|k| {
                        let e = k * experts / keep;
                        (e * size..(e + 1) * size, 1.0)
                    })
                    .collect::<Vec<_>>(),
            ];
            time(&format!("experts of {size}, {budget}"), &mut |l| {
                nm[l].forward(&x, 1, &Selection::Blocks(&routes), &mut y);
            });
        }
    }
}
