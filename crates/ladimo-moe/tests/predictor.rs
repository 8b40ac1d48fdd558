//! A block with a low-rank router (a predictor in front of it) against the same block with the
//! product as one full router: the same output on every path (few tokens, the host kernel, the
//! dispatch, the dense-masked prefill, the reference), its parameters counted as activated, a
//! block file round trip, and a rank above the hidden size refused.

use burn::tensor::{Tensor, TensorData};
use ladimo_io::HostTensor;
use ladimo_model::util::to_vec;
use ladimo_model::{Dtype, FeedForward};
use ladimo_moe::block_file::{load_block, save_block};
use ladimo_moe::{Combine, CombineWeights, HostFfn, MoeBlock, Policy};
use ladimo_tests::{random_ffn, random_host, rel_err};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HIDDEN: usize = 16;
const EXPERTS: usize = 8;
const SIZE: usize = 6;
const RANK: usize = 5;

/// The low-rank block and the same block with `up x down` as its router.
fn blocks(shared: bool, policy: Policy) -> (MoeBlock, MoeBlock) {
    let mut rng = StdRng::seed_from_u64(11);
    let down = random_host(&mut rng, vec![RANK, HIDDEN], 1.0);
    let up = random_host(&mut rng, vec![EXPERTS, RANK], 1.0);
    let bias = random_host(&mut rng, vec![EXPERTS], 0.3);
    let experts: Vec<HostFfn> = (0..EXPERTS).map(|_| random_ffn(&mut rng, SIZE, HIDDEN)).collect();
    let shared = shared.then(|| random_ffn(&mut rng, 4, HIDDEN));
    let mut full = vec![0f32; EXPERTS * HIDDEN];
    for i in 0..EXPERTS {
        for c in 0..HIDDEN {
            full[i * HIDDEN + c] = (0..RANK)
                .map(|k| up.data[i * RANK + k] * down.data[k * HIDDEN + c])
                .sum();
        }
    }
    let full = HostTensor::new(vec![EXPERTS, HIDDEN], full);
    let combine = Combine {
        weights: CombineWeights::Unit,
        scale: 1.0,
    };
    let device = ladimo_backend::device();
    let make = || {
        MoeBlock::new(
            &full,
            Some(&bias),
            &experts,
            shared.as_ref(),
            combine,
            policy.clone(),
            &device,
        )
        .unwrap()
    };
    let low = make().with_predictor(&down, &up, Some(&bias)).unwrap();
    (low, make())
}

fn tokens(n: usize, seed: u64) -> Tensor<2> {
    let mut rng = StdRng::seed_from_u64(seed);
    let data: Vec<f32> = (0..n * HIDDEN).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_data(TensorData::new(data, [n, HIDDEN]), &ladimo_backend::device())
}

#[test]
fn a_low_rank_router_computes_what_its_product_does_on_every_path() {
    for shared in [false, true] {
        for policy in [
            Policy::TopK { k: 3 },
            Policy::TopP {
                p: 0.6,
                min_k: 1,
                max_k: 6,
            },
        ] {
            let (mut low, mut full) = blocks(shared, policy.clone());
            assert_eq!(low.predictor_rank(), Some(RANK));
            assert_eq!(low.hidden_size(), HIDDEN);
            let what = format!("shared {shared}, {policy}");
            let check = |low: &MoeBlock, full: &MoeBlock, n: usize, path: &str| {
                let x = tokens(n, n as u64);
                let a = to_vec(low.forward_tokens(x.clone()).unwrap());
                let b = to_vec(full.forward_tokens(x.clone()).unwrap());
                let e = rel_err(&a, &b);
                assert!(e < 1e-5, "{what}, {path}, {n} tokens: relative error {e:.2e}");
                let r = to_vec(low.forward_dense(x).unwrap());
                assert!(
                    rel_err(&a, &r) < 1e-5,
                    "{what}, {path}, {n} tokens: against the reference"
                );
            };
            for n in [1, 2, 7, 40] {
                check(&low, &full, n, "burn");
            }
            assert!(low.set_masked_from(Some(1)) && full.set_masked_from(Some(1)));
            check(&low, &full, 40, "dense-masked");
            low.prepare_host(Dtype::F32);
            full.prepare_host(Dtype::F32);
            for n in [1, 2, 7] {
                let x = to_vec(tokens(n, 100 + n as u64));
                let a = low.forward_kernel(&x, n).unwrap().unwrap();
                let b = full.forward_kernel(&x, n).unwrap().unwrap();
                let e = rel_err(&a, &b);
                assert!(e < 1e-5, "{what}, host kernel, {n} tokens: relative error {e:.2e}");
            }
        }
    }
}

#[test]
fn the_predictor_counts_as_activated_and_survives_a_block_file() {
    let (low, full) = blocks(true, Policy::TopK { k: 3 });
    let shared = 3 * 4 * HIDDEN;
    assert_eq!(low.fixed_params(), RANK * HIDDEN + EXPERTS * RANK + EXPERTS + shared);
    assert_eq!(full.fixed_params(), EXPERTS * HIDDEN + EXPERTS + shared);
    let x = tokens(7, 3);
    let y = low.forward_tokens(x.clone()).unwrap();
    let active = low.active_params_per_token();
    let per_expert = 3 * SIZE * HIDDEN;
    assert!(
        (active - (low.fixed_params() + 3 * per_expert) as f64).abs() < 1e-9,
        "active {active}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.moe.safetensors");
    save_block(&path, &low).unwrap();
    let back = load_block(&path, Policy::TopK { k: 3 }, &ladimo_backend::device()).unwrap();
    assert_eq!(back.predictor_rank(), Some(RANK));
    assert_eq!(back.fixed_params(), low.fixed_params());
    assert_eq!(to_vec(back.forward_tokens(x).unwrap()), to_vec(y));
}

#[test]
fn a_predictor_rank_above_the_hidden_size_is_refused() {
    let (_, full) = blocks(false, Policy::TopK { k: 2 });
    let mut rng = StdRng::seed_from_u64(1);
    let down = random_host(&mut rng, vec![HIDDEN + 1, HIDDEN], 1.0);
    let up = random_host(&mut rng, vec![EXPERTS, HIDDEN + 1], 1.0);
    let err = full.with_predictor(&down, &up, None).unwrap_err().to_string();
    assert!(
        err.contains("predictor rank 17") && err.contains("hidden size 16"),
        "{err}"
    );
}
