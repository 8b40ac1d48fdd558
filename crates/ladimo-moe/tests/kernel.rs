//! The host-side decode kernels against the reference paths, on real SmolLM2 weights and hidden
//! states: activation sparsity (static, CATS, TEAL) against [`SparseFfn`]'s masked path, MoE
//! blocks with experts of 1 to 64 neurons against [`MoeBlock::forward_dense`], at 1, 2 and 7
//! tokens, in f32 (max relative error 1e-5) and 16 bits (stated bounds).

use burn::tensor::Tensor;
use ladimo_io::HostTensor;
use ladimo_model::util::to_vec;
use ladimo_model::{Dtype, FeedForward};
use ladimo_moe::sparsity::{SparseFfn, Sparsity, dense_ffn};
use ladimo_moe::{Combine, CombineWeights, HostFfn, MoeBlock, Policy};
use ladimo_tests::{rel_err, smol};

const TEXT: &str = "It was a truth universally acknowledged that a single man in possession of a good fortune \
                    must be in want of a wife. 대한민국은 민주공화국이다. fn main() { println!(\"{}\", 42); }";

/// The real input of layer `layer`'s FFN on TEXT: `[tokens, hidden]`.
fn ffn_input(layer: usize) -> Tensor<2> {
    ladimo_tests::smol_ffn_input(TEXT, layer)
}

const TOKENS: [usize; 3] = [1, 2, 7];

#[test]
fn sparsity_kernels_equal_the_masked_reference() {
    let s = smol();
    let layer = 11;
    let x = ffn_input(layer);
    let dense = dense_ffn(&s.model, layer).unwrap();
    let keep: Vec<u32> = (0..1536).filter(|j| j % 3 != 1).collect();
    for sp in [
        Sparsity::Static { keep },
        Sparsity::Cats { gate: 0.05 },
        Sparsity::Teal { x: 0.02, h: 0.004 },
        Sparsity::Teal { x: 0.0, h: 0.0 },
    ] {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let mut f = SparseFfn::new(dense, sp.clone()).unwrap();
            assert!(
                f.forward_kernel(&[0.0; 576], 1).is_none(),
                "no kernel before prepare_host"
            );
            f.prepare_host(dtype);
            for n in TOKENS {
                let xs = x.clone().narrow(0, 5, n);
                let (want, want_read) = f.forward_tokens(xs.clone());
                let (got, read) = f.forward_kernel(&to_vec(xs), n).unwrap();
                let e = rel_err(&got, &to_vec(want));
                // 16 bits: the weights are rounded here and not in the reference.
                let bound = match dtype {
                    Dtype::F32 => 1e-5,
                    Dtype::F16 => 4e-3,
                    Dtype::Bf16 => 3e-2,
                };
                assert!(
                    e <= bound,
                    "{sp}, {dtype}, {n} tokens: relative error {e:.2e} > {bound:.0e}"
                );
                if dtype == Dtype::F32 {
                    // A value right at a threshold may fall either way between the two sums.
                    assert!(
                        (read - want_read).abs() <= 2.0 * 1536.0,
                        "{sp}: read {read}, reference {want_read}"
                    );
                }
            }
        }
    }
}

#[test]
fn moe_kernels_equal_the_dense_reference_for_experts_of_1_to_64_neurons() {
    let s = smol();
    let device = &s.model.device;
    let dense = HostFfn::from_checkpoint(&s.ckpt, 4).unwrap();
    let x = ffn_input(4);
    for shared in [0usize, 384] {
        let routed = 1536 - shared;
        for size in [1usize, 2, 4, 8, 16, 32, 64] {
            let n_exp = routed / size;
            let experts: Vec<HostFfn> = (0..n_exp)
                .map(|e| dense.select_neurons(&(shared + e * size..shared + (e + 1) * size).collect::<Vec<_>>()))
                .collect();
            let shared_ffn = (shared > 0).then(|| dense.select_neurons(&(0..shared).collect::<Vec<_>>()));
            let router = HostTensor::new(
                vec![n_exp, 576],
                (0..n_exp * 576)
                    .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
                    .collect(),
            );
            let combine = Combine {
                weights: if size % 2 == 0 {
                    CombineWeights::Renormalized
                } else {
                    CombineWeights::Unit
                },
                scale: 1.0,
            };
            let mut moe = MoeBlock::new(
                &router,
                None,
                &experts,
                shared_ffn.as_ref(),
                combine,
                Policy::TopK { k: n_exp / 2 },
                device,
            )
            .unwrap();
            for dtype in [Dtype::F32, Dtype::F16] {
                moe.prepare_host(dtype);
                for n in TOKENS {
                    let xs = x.clone().narrow(0, 3, n);
                    let want = to_vec(moe.forward_dense(xs.clone()).unwrap());
                    let got = moe.forward_kernel(&to_vec(xs.clone()), n).unwrap().unwrap();
                    let e = rel_err(&got, &want);
                    let bound = if dtype == Dtype::F32 { 1e-5 } else { 4e-3 };
                    assert!(
                        e <= bound,
                        "{n_exp} experts of {size} (+{shared} shared), {dtype}, {n} tokens: {e:.2e} > {bound:.0e}"
                    );
                    // The block's own decode path (forward_tokens at up to 8 tokens) is the kernel.
                    let via_block = to_vec(moe.forward_tokens(xs).unwrap());
                    assert_eq!(via_block, got);
                }
            }
        }
    }
}
