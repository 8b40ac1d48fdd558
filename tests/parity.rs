//! Our logits against Hugging Face transformers' on the same weights (fixtures written by
//! `scripts/make_fixtures.py`), and the tokenizer against transformers' ids.

use ladimo_io::Checkpoint;
use ladimo_model::Transformer;
use ladimo_model::generate::{SamplingConfig, generate};
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_tests::{Reference, fixture, max_abs_diff, smol};

fn tiny_parity(dir: &str, tol: f32) {
    let ckpt = Checkpoint::open(fixture(dir)).unwrap();
    let device = ladimo_backend::device();
    let model = Transformer::from_checkpoint(&ckpt, &device).unwrap();
    let r = Reference::open(&fixture(dir).join("reference.safetensors"));
    let (shape, ids) = r.ids("input_ids");
    let (lshape, want) = r.f32("logits");
    let got = to_vec(model.forward(ids_tensor(&ids, shape[0], &device)).unwrap());
    assert_eq!(got.len(), lshape.iter().product::<usize>());
    let d = max_abs_diff(&got, &want);
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    eprintln!("{dir}: max |diff| {d:.3e} (max |logit| {scale:.3})");
    assert!(
        d <= tol * scale.max(1.0),
        "{dir}: max |diff| {d} > {tol} (relative to {scale})"
    );
}

#[test]
fn tiny_hyperclovax_matches_transformers() {
    tiny_parity("tiny-hcx", 1e-4);
}

#[test]
fn tiny_llama3_bf16_sharded_matches_transformers() {
    tiny_parity("tiny-llama3", 1e-4);
}

#[test]
fn tiny_llama_linear_rope_f16_tied_matches_transformers() {
    tiny_parity("tiny-llama-linear", 1e-4);
}

#[test]
fn tiny_llama_kv_cache_matches_full_forward() {
    // Decoding one token at a time with the cache gives the logits of the full forward pass.
    let ckpt = Checkpoint::open(fixture("tiny-llama3")).unwrap();
    let device = ladimo_backend::device();
    let model = Transformer::from_checkpoint(&ckpt, &device).unwrap();
    let ids: Vec<u32> = (0..20).map(|i| (i * 37 % 500) as u32).collect();
    let full = to_vec(model.forward(ids_tensor(&ids, 1, &device)).unwrap());
    let v = ckpt.config.vocab_size;
    let mut cache = ladimo_model::KvCache::new(model.layers.len());
    let mut stepped = to_vec(
        model
            .forward_last(ids_tensor(&ids[..7], 1, &device), &mut cache)
            .unwrap(),
    );
    assert!(max_abs_diff(&stepped, &full[6 * v..7 * v]) < 1e-4);
    for (i, &id) in ids.iter().enumerate().skip(7) {
        stepped = to_vec(model.forward_last(ids_tensor(&[id], 1, &device), &mut cache).unwrap());
        let d = max_abs_diff(&stepped, &full[i * v..(i + 1) * v]);
        assert!(d < 1e-4, "position {i}: {d}");
    }
}

fn prompts() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/prompts.json")).unwrap()).unwrap()
}

#[test]
fn smollm2_logits_match_transformers_gguf_loader() {
    let s = smol();
    let r = Reference::open(&fixture("smollm2/reference.safetensors"));
    let texts = prompts()["texts"].as_array().unwrap().clone();
    let device = &s.model.device;
    for (i, text) in texts.iter().enumerate() {
        let (_, ids) = r.ids(&format!("p{i}.ids"));
        assert_eq!(
            s.ckpt.tokenizer().unwrap().encode(text.as_str().unwrap()).unwrap(),
            ids,
            "prompt {i} ids"
        );
        let logits = to_vec(s.model.forward(ids_tensor(&ids, 1, device)).unwrap());
        let v = s.ckpt.config.vocab_size;
        let t = ids.len();
        let (_, last) = r.f32(&format!("p{i}.last_logits"));
        let d_last = max_abs_diff(&logits[(t - 1) * v..], &last);
        let (_, top_ids) = r.ids(&format!("p{i}.top50_ids"));
        let (_, top_logits) = r.f32(&format!("p{i}.top50_logits"));
        let mut d_top = 0f32;
        for (k, (&id, &want)) in top_ids.iter().zip(&top_logits).enumerate() {
            let pos = k / 50;
            d_top = d_top.max((logits[pos * v + id as usize] - want).abs());
        }
        eprintln!("prompt {i}: last-position max |diff| {d_last:.2e}, top-50 per position {d_top:.2e}");
        assert!(d_last <= 1e-3, "prompt {i}: last logits differ by {d_last}");
        assert!(d_top <= 1e-3, "prompt {i}: top-50 logits differ by {d_top}");
    }
}

#[test]
fn smollm2_greedy_says_paris_with_llama_cpp_logprob() {
    let s = smol();
    let tok = s.ckpt.tokenizer().unwrap();
    let ids = tok.encode("The capital of France is").unwrap();
    assert_eq!(ids, [504, 3575, 282, 4649, 314]);
    let logits = to_vec(s.model.forward(ids_tensor(&ids, 1, &s.model.device)).unwrap());
    let v = s.ckpt.config.vocab_size;
    let last = &logits[4 * v..];
    let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64 + last.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln();
    let paris = last[7042] as f64 - lse;
    eprintln!("log p(' Paris') = {paris:.4} (llama.cpp: -0.264)");
    assert!((paris - (-0.264)).abs() <= 0.01, "log p(' Paris') = {paris}");
    let cfg = SamplingConfig {
        max_new_tokens: 8,
        ..Default::default()
    };
    let out = generate(&s.model, &ids, &cfg, |_| {}).unwrap();
    let text = tok.decode(&out).unwrap();
    assert!(text.starts_with(" Paris"), "greedy continuation: {text:?}");
    let want = &prompts()["greedy8"]["ids"];
    if let Some(want) = want.as_array() {
        let want: Vec<u32> = want.iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(out, want, "greedy continuation differs from transformers: {text:?}");
    }
}

#[test]
fn smollm2_tokenizer_matches_transformers_ids() {
    let tok = smol().ckpt.tokenizer().unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/tokenizer_cases.json")).unwrap()).unwrap();
    let mut n = 0;
    for c in cases.as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want).unwrap(), text, "decode {text:?}");
        n += 1;
    }
    assert!(n >= 30, "only {n} tokenizer cases");
}
