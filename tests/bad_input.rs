//! Broken checkpoints give one clear error that names the file (and the tensor), never a panic.

use std::path::Path;

use ladimo_io::Checkpoint;
use ladimo_model::Transformer;
use ladimo_tests::{GgufBuilder, copy_fixture_dir};

/// Open and build the model; return the error text (panics if it loads).
fn load_err(path: &Path) -> String {
    let r = Checkpoint::open(path).map_err(|e| e.to_string()).and_then(|c| {
        Transformer::from_checkpoint(&c, &ladimo_backend::device())
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    match r {
        Ok(()) => panic!("{} loaded, but it is broken", path.display()),
        Err(e) => e,
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error {err:?} does not mention {p:?}");
    }
}

/// Rewrite the safetensors file of a copy of the tiny HyperCLOVA X fixture.
fn broken_safetensors(edit: impl FnOnce(Vec<u8>) -> Vec<u8>) -> (tempfile::TempDir, String) {
    let dir = copy_fixture_dir("tiny-hcx");
    let f = dir.path().join("model.safetensors");
    std::fs::write(&f, edit(std::fs::read(&f).unwrap())).unwrap();
    let e = load_err(dir.path());
    (dir, e)
}

fn header(bytes: &[u8]) -> (usize, serde_json::Value) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (n, serde_json::from_slice(&bytes[8..8 + n]).unwrap())
}

fn with_header(bytes: &[u8], h: &serde_json::Value) -> Vec<u8> {
    let (n, _) = header(bytes);
    let mut hs = serde_json::to_vec(h).unwrap();
    while !hs.len().is_multiple_of(8) {
        hs.push(b' ');
    }
    let mut out = (hs.len() as u64).to_le_bytes().to_vec();
    out.extend(hs);
    out.extend(&bytes[8 + n..]);
    out
}

#[test]
fn truncated_safetensors() {
    let (_d, e) = broken_safetensors(|b| b[..b.len() - 100].to_vec());
    assert_mentions(&e, &["model.safetensors", "truncated", "tensor `"]);
}

#[test]
fn safetensors_header_longer_than_file() {
    let (_d, e) = broken_safetensors(|mut b| {
        b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        b
    });
    assert_mentions(&e, &["model.safetensors", "header length", "longer than the file"]);
}

#[test]
fn safetensors_header_not_json() {
    let (_d, e) = broken_safetensors(|mut b| {
        b[8] = b'#';
        b
    });
    assert_mentions(&e, &["model.safetensors", "not valid JSON"]);
}

#[test]
fn safetensors_unknown_dtype() {
    let (_d, e) = broken_safetensors(|b| {
        let (_, mut h) = header(&b);
        h["model.layers.0.mlp.up_proj.weight"]["dtype"] = "Q7".into();
        with_header(&b, &h)
    });
    assert_mentions(
        &e,
        &[
            "model.safetensors",
            "model.layers.0.mlp.up_proj.weight",
            "unsupported dtype `Q7`",
        ],
    );
}

#[test]
fn tensor_shape_disagrees_with_config() {
    let dir = copy_fixture_dir("tiny-hcx");
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = 200.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &[
            "model.safetensors",
            "mlp.gate_proj.weight",
            "disagrees with config.json",
        ],
    );
}

#[test]
fn missing_tensor() {
    let (_d, e) = broken_safetensors(|b| {
        let (_, mut h) = header(&b);
        h.as_object_mut().unwrap().remove("model.layers.1.post_norm2.weight");
        with_header(&b, &h)
    });
    assert_mentions(
        &e,
        &["model.safetensors", "model.layers.1.post_norm2.weight", "missing"],
    );
}

#[test]
fn unknown_architecture() {
    let dir = copy_fixture_dir("tiny-hcx");
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    cfg["model_type"] = "gpt_neox".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &["config.json", "GPTNeoXForCausalLM", "supported: LlamaForCausalLM"],
    );
}

#[test]
fn missing_directory_and_config() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert_mentions(&e, &["/nonexistent/model"]);
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path());
    assert_mentions(&e, &["config.json", "no such file"]);
    // A folder that holds a GGUF file: the error names it.
    std::fs::write(dir.path().join("m.Q4_1.gguf"), b"GGUF").unwrap();
    let e = load_err(dir.path());
    assert_mentions(&e, &["config.json", "for GGUF give the file: m.Q4_1.gguf"]);
}

fn gguf_err(bytes: Vec<u8>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.gguf");
    std::fs::write(&p, bytes).unwrap();
    let e = load_err(&p);
    assert!(e.contains("bad.gguf"), "{e:?} does not name the file");
    e
}

#[test]
fn gguf_bad_magic() {
    let mut b = GgufBuilder::tiny_llama().build();
    b[..4].copy_from_slice(b"GGML");
    assert_mentions(&gguf_err(b), &["bad magic"]);
}

#[test]
fn gguf_bad_version() {
    let mut g = GgufBuilder::tiny_llama();
    g.version = 7;
    assert_mentions(&gguf_err(g.build()), &["GGUF version 7"]);
}

#[test]
fn gguf_truncated() {
    // The last tensor's data is cut short.
    let b = GgufBuilder::tiny_llama()
        .tensor("output_norm.weight", &[8], 0, vec![0; 32])
        .build();
    assert_mentions(
        &gguf_err(b[..b.len() - 10].to_vec()),
        &["output_norm.weight", "truncated"],
    );
    // The header itself is cut short.
    assert_mentions(&gguf_err(b[..40].to_vec()), &["truncated"]);
}

#[test]
fn gguf_unsupported_quantization_is_named() {
    // A Q4_K (ggml type 12) token embedding: 144 bytes per 256 values.
    let g = GgufBuilder::tiny_llama().tensor("token_embd.weight", &[256, 1], 12, vec![0; 144]);
    let e = gguf_err(g.build());
    assert_mentions(&e, &["token_embd.weight", "unsupported quantization Q4_K"]);
}

#[test]
fn gguf_missing_tensor_and_unknown_arch() {
    let e = gguf_err(GgufBuilder::tiny_llama().build());
    assert_mentions(&e, &["model.embed_tokens.weight", "missing"]);
    let g = GgufBuilder::default().str("general.architecture", "mamba");
    assert_mentions(&gguf_err(g.build()), &["GGUF architecture `mamba`"]);
}

/// Held-out text is the files joined in order, read from the start; too little of it is an error
/// that names the first file.
#[test]
fn held_out_tokens_join_files_in_order_and_refuse_short_text() {
    let tok = ladimo_tests::smol().ckpt.tokenizer().unwrap();
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.txt"), d.path().join("b.jsonl"));
    std::fs::write(&a, "The capital of France is").unwrap();
    std::fs::write(&b, "{\"text\": \"Paris.\"}\n{\"text\": \"Yes.\"}\n").unwrap();
    let files = [a, b];
    let all = tok.encode("The capital of France is\nParis.\nYes.\n").unwrap();
    let ids = ladimo_data::heldout_tokens(tok, &files, 7).unwrap();
    assert_eq!(ids, all[..7]);
    let e = ladimo_data::heldout_tokens(tok, &files, 1000).unwrap_err().to_string();
    assert_mentions(&e, &["a.txt", "2 held-out file(s)", "fewer than the 1000"]);
}
