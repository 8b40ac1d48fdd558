//! The host decode path (ladimo-kernel) against burn's path on SmolLM2: the same logits at every
//! decode step after a prompt, in f32 and on 16-bit weights (both paths on the same rounded
//! weights), and the same greedy tokens.

use ladimo_io::Checkpoint;
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_model::{Dtype, KvCache, Transformer};

const TEXT: &str = "It was a truth universally acknowledged that a single man in possession of a good fortune \
                    must be in want of a wife.";

/// Logits of each decode step (`steps` greedy tokens after the prompt, fed `step` at a time).
fn decode_logits(model: &Transformer, prompt: &[u32], steps: usize, step: usize) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(model.layers.len());
    let mut l = to_vec(
        model
            .forward_last(ids_tensor(prompt, 1, &model.device), &mut cache)
            .unwrap(),
    );
    let mut out = vec![l.clone()];
    let mut pending = Vec::new();
    while out.len() <= steps {
        pending.push(ladimo_model::generate::argmax(&l));
        if pending.len() == step {
            l = to_vec(
                model
                    .forward_last(ids_tensor(&pending, 1, &model.device), &mut cache)
                    .unwrap(),
            );
            pending.clear();
            out.push(l.clone());
        }
    }
    out
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    ladimo_tests::max_abs_diff(a, b) / scale
}

#[test]
fn host_decode_equals_the_burn_path_in_f32_and_16_bits() {
    let path = ladimo_tests::smollm2();
    let device = ladimo_backend::device();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        let mut ckpt = Checkpoint::open(&path).unwrap();
        ladimo_model::round_weights(&mut ckpt, dtype);
        let ids = ckpt.tokenizer().unwrap().encode(TEXT).unwrap();
        let mut model = Transformer::from_checkpoint(&ckpt, &device).unwrap();
        let burn: Vec<Vec<f32>> = [1, 3].iter().flat_map(|&s| decode_logits(&model, &ids, 6, s)).collect();
        model.prepare_host_decode(dtype).unwrap();
        // Whatever the timing chose, take the host path for steps of up to 8 tokens here.
        model.host.as_mut().unwrap().max_tokens = 8;
        let host: Vec<Vec<f32>> = [1, 3].iter().flat_map(|&s| decode_logits(&model, &ids, 6, s)).collect();
        for (i, (h, b)) in host.iter().zip(&burn).enumerate() {
            let e = rel_err(h, b);
            eprintln!("{dtype} step {i}: relative error {e:.2e}");
            assert!(e < 1e-4, "{dtype}, step {i}: host vs burn relative error {e:.2e}");
            assert_eq!(
                ladimo_model::generate::argmax(h),
                ladimo_model::generate::argmax(b),
                "{dtype} step {i}"
            );
        }
    }
}
