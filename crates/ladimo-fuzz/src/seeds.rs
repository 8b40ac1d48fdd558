//! Small valid input files, built here (a GGUF writer that records where its numeric fields are,
//! safetensors files written with the safetensors crate) or taken from the repository (the
//! committed tiny models' config.json and tokenizer.json, configs/*.toml).

use std::collections::BTreeMap;

use half::{bf16, f16};

use crate::mutate::{Field, FieldKind, Seed, Syntax};

/// The repository's `tests/fixtures` and `configs` files the seeds are made from.
macro_rules! repo_file {
    ($path:literal) => {
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $path))
    };
}

/// GGUF metadata value type codes.
const GGUF_U32: u32 = 4;
const GGUF_I32: u32 = 5;
const GGUF_F32: u32 = 6;
const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;

/// ggml tensor type codes.
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_Q4_0: u32 = 2;
const GGML_Q4_1: u32 = 3;
const GGML_Q8_0: u32 = 8;
const GGML_BF16: u32 = 30;

/// A metadata value for [`GgufWriter`].
pub enum Meta {
    U32(u32),
    I32(i32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

/// Writes a GGUF v3 file and records the position of every numeric field it writes.
#[derive(Default)]
pub struct GgufWriter {
    pub bytes: Vec<u8>,
    pub fields: Vec<Field>,
}

impl GgufWriter {
    fn num(&mut self, v: u64, width: usize, kind: FieldKind) {
        self.fields.push(Field {
            offset: self.bytes.len(),
            width,
            kind,
        });
        self.bytes.extend_from_slice(&v.to_le_bytes()[..width]);
    }

    fn string(&mut self, s: &str) {
        self.num(s.len() as u64, 8, FieldKind::Length);
        self.bytes.extend_from_slice(s.as_bytes());
    }

    /// A whole file: metadata, then tensors `(name, ne0-first dims, ggml type, raw data)`.
    pub fn file(meta: &[(&str, Meta)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Self {
        const ALIGN: usize = 32;
        let mut w = GgufWriter::default();
        w.bytes.extend_from_slice(b"GGUF");
        w.bytes.extend_from_slice(&3u32.to_le_bytes());
        w.num(tensors.len() as u64, 8, FieldKind::Count);
        w.num(meta.len() as u64, 8, FieldKind::Count);
        for (key, value) in meta {
            w.string(key);
            match value {
                Meta::U32(v) => {
                    w.num(GGUF_U32 as u64, 4, FieldKind::Type);
                    w.bytes.extend_from_slice(&v.to_le_bytes());
                }
                Meta::I32(v) => {
                    w.num(GGUF_I32 as u64, 4, FieldKind::Type);
                    w.bytes.extend_from_slice(&v.to_le_bytes());
                }
                Meta::F32(v) => {
                    w.num(GGUF_F32 as u64, 4, FieldKind::Type);
                    w.bytes.extend_from_slice(&v.to_le_bytes());
                }
                Meta::Str(s) => {
                    w.num(GGUF_STRING as u64, 4, FieldKind::Type);
                    w.string(s);
                }
                Meta::Strs(items) => {
                    w.num(GGUF_ARRAY as u64, 4, FieldKind::Type);
                    w.num(GGUF_STRING as u64, 4, FieldKind::Type);
                    w.num(items.len() as u64, 8, FieldKind::Count);
                    for s in items {
                        w.string(s);
                    }
                }
                Meta::I32s(items) => {
                    w.num(GGUF_ARRAY as u64, 4, FieldKind::Type);
                    w.num(GGUF_I32 as u64, 4, FieldKind::Type);
                    w.num(items.len() as u64, 8, FieldKind::Count);
                    for v in items {
                        w.bytes.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        let mut offset = 0usize;
        for (name, dims, ty, data) in tensors {
            w.string(name);
            w.num(dims.len() as u64, 4, FieldKind::Count);
            for &d in dims {
                w.num(d, 8, FieldKind::Dim);
            }
            w.num(*ty as u64, 4, FieldKind::Type);
            w.num(offset as u64, 8, FieldKind::Offset);
            offset = (offset + data.len()).div_ceil(ALIGN) * ALIGN;
        }
        for (_, _, _, data) in tensors {
            w.bytes.resize(w.bytes.len().div_ceil(ALIGN) * ALIGN, 0);
            w.bytes.extend_from_slice(data);
        }
        w
    }
}

/// `n` deterministic small values (a sine), for tensor data.
fn values(n: usize, phase: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + phase).sin() * 0.5).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()
}
fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()
}
/// Q8_0 blocks of 32 values (f16 scale, 32 i8).
fn q8_0_bytes(v: &[f32]) -> Vec<u8> {
    v.chunks(32)
        .flat_map(|b| {
            let d = b.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            let mut out = f16::from_f32(d).to_le_bytes().to_vec();
            out.extend(b.iter().map(|x| (x / d.max(1e-9)).round() as i8 as u8));
            out
        })
        .collect()
}
/// Q4_0 (f16 scale, 16 bytes of nibbles) or Q4_1 (f16 scale, f16 min, nibbles) blocks.
fn q4_bytes(v: &[f32], with_min: bool) -> Vec<u8> {
    v.chunks(32)
        .flat_map(|b| {
            let mut out = f16::from_f32(0.05).to_le_bytes().to_vec();
            if with_min {
                out.extend(f16::from_f32(-0.4).to_le_bytes());
            }
            out.extend(
                (0..16).map(|j| ((b[j] * 10.0) as i8 as u8 & 0x0f) | (((b[j + 16] * 10.0) as i8 as u8 & 0x0f) << 4)),
            );
            out
        })
        .collect()
}

/// The byte-level BPE vocabulary of the tiny GGUF and tiny tokenizer seeds.
fn tiny_vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
    tokens.extend(
        [
            "h", "e", "l", "o", "Ġ", "w", "r", "d", "1", "2", "he", "ll", "Ġw", "hell",
        ]
        .map(String::from),
    );
    let merges = ["h e", "l l", "Ġ w", "he ll"].map(String::from).to_vec();
    let mut types = vec![3, 4];
    types.extend(std::iter::repeat_n(1, tokens.len() - 2));
    (tokens, merges, types)
}

/// A tiny LLaMA GGUF (hidden 8, 2 heads of 4, 1 KV head, FFN 16, one layer) with tensors in
/// F32, F16, BF16, Q8_0, Q4_0 and Q4_1, and a gpt2 tokenizer in its metadata.
pub fn tiny_gguf() -> Seed {
    tiny_gguf_with(|_| {})
}

/// [`tiny_gguf`] with its metadata edited by `edit` first (for tests of one broken key).
pub fn tiny_gguf_with(edit: impl FnOnce(&mut Vec<(&'static str, Meta)>)) -> Seed {
    let (tokens, merges, types) = tiny_vocab();
    let vocab = tokens.len() as u64;
    let mut meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("general.alignment", Meta::U32(32)),
        ("llama.embedding_length", Meta::U32(8)),
        ("llama.attention.head_count", Meta::U32(2)),
        ("llama.attention.head_count_kv", Meta::U32(1)),
        ("llama.feed_forward_length", Meta::U32(16)),
        ("llama.block_count", Meta::U32(1)),
        ("llama.context_length", Meta::U32(64)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.merges", Meta::Strs(merges)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(0)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(0)),
    ];
    edit(&mut meta);
    let t = |name: &'static str, dims: Vec<u64>, ty: u32, phase: f32| {
        let n: u64 = dims.iter().product();
        let v = values(n as usize, phase);
        let data = match ty {
            GGML_F32 => f32_bytes(&v),
            GGML_F16 => f16_bytes(&v),
            GGML_BF16 => bf16_bytes(&v),
            GGML_Q8_0 => q8_0_bytes(&v),
            GGML_Q4_0 => q4_bytes(&v, false),
            GGML_Q4_1 => q4_bytes(&v, true),
            _ => unreachable!(),
        };
        (name, dims, ty, data)
    };
    let tensors = vec![
        t("token_embd.weight", vec![8, vocab], GGML_F32, 0.0),
        t("output_norm.weight", vec![8], GGML_F32, 0.1),
        t("blk.0.attn_norm.weight", vec![8], GGML_F32, 0.2),
        t("blk.0.ffn_norm.weight", vec![8], GGML_F32, 0.3),
        t("blk.0.attn_q.weight", vec![8, 8], GGML_F16, 0.4),
        t("blk.0.attn_k.weight", vec![8, 4], GGML_Q8_0, 0.5),
        t("blk.0.attn_v.weight", vec![8, 4], GGML_BF16, 0.6),
        t("blk.0.attn_output.weight", vec![8, 8], GGML_F32, 0.7),
        t("blk.0.ffn_gate.weight", vec![8, 16], GGML_Q4_0, 0.8),
        t("blk.0.ffn_up.weight", vec![8, 16], GGML_Q4_1, 0.9),
        t("blk.0.ffn_down.weight", vec![16, 8], GGML_F16, 1.0),
    ];
    let w = GgufWriter::file(&meta, &tensors);
    Seed {
        name: "tiny llama GGUF (F32, F16, BF16, Q8_0, Q4_0, Q4_1; gpt2 tokenizer)".into(),
        bytes: w.bytes,
        syntax: Syntax::Binary,
        fields: w.fields,
    }
}

/// A safetensors file of `tensors` (`(name, shape, dtype, values)`), written by the safetensors
/// crate.
pub fn safetensors_file(tensors: &[(&str, Vec<usize>, safetensors::Dtype, Vec<f32>)]) -> Vec<u8> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, dtype, v)| match dtype {
            safetensors::Dtype::F32 => f32_bytes(v),
            safetensors::Dtype::F16 => f16_bytes(v),
            safetensors::Dtype::BF16 => bf16_bytes(v),
            other => panic!("seed tensors are F32, F16 or BF16, not {other:?}"),
        })
        .collect();
    let views: BTreeMap<String, safetensors::tensor::TensorView<'_>> = tensors
        .iter()
        .zip(&data)
        .map(|((name, shape, dtype, _), bytes)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).expect("seed tensor view");
            (name.to_string(), view)
        })
        .collect();
    safetensors::tensor::serialize(views, None).expect("serialize seed safetensors")
}

/// The tensors of a tiny dense LLaMA (hidden 8, FFN 16, vocab 16, one layer) in three dtypes.
pub fn tiny_hf_tensors() -> Vec<(&'static str, Vec<usize>, safetensors::Dtype, Vec<f32>)> {
    use safetensors::Dtype::{BF16, F16, F32};
    let t = |name, shape: Vec<usize>, dtype, phase| {
        let n = shape.iter().product();
        (name, shape, dtype, values(n, phase))
    };
    vec![
        t("model.embed_tokens.weight", vec![16, 8], F32, 0.0),
        t("model.norm.weight", vec![8], F32, 0.1),
        t("model.layers.0.input_layernorm.weight", vec![8], BF16, 0.2),
        t("model.layers.0.post_attention_layernorm.weight", vec![8], BF16, 0.3),
        t("model.layers.0.self_attn.q_proj.weight", vec![8, 8], F16, 0.4),
        t("model.layers.0.self_attn.k_proj.weight", vec![4, 8], F16, 0.5),
        t("model.layers.0.self_attn.v_proj.weight", vec![4, 8], F32, 0.6),
        t("model.layers.0.self_attn.o_proj.weight", vec![8, 8], F32, 0.7),
        t("model.layers.0.mlp.gate_proj.weight", vec![16, 8], BF16, 0.8),
        t("model.layers.0.mlp.up_proj.weight", vec![16, 8], F16, 0.9),
        t("model.layers.0.mlp.down_proj.weight", vec![8, 16], F32, 1.0),
    ]
}

/// The `config.json` of the tiny dense LLaMA of [`tiny_hf_tensors`].
pub const TINY_HF_CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama",
"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
"num_key_value_heads":1,"vocab_size":16,"rms_norm_eps":1e-5,"rope_theta":10000.0,
"max_position_embeddings":64,"tie_word_embeddings":true,"hidden_act":"silu","bos_token_id":0,"eos_token_id":[0]}"#;

/// The tiny model's weights as one `model.safetensors`.
pub fn tiny_safetensors() -> Seed {
    Seed::new(
        "tiny llama model.safetensors (F32, F16, BF16)",
        safetensors_file(&tiny_hf_tensors()),
        Syntax::Safetensors,
    )
}

/// The shard files of the sharded tiny model: `(file name, bytes)`; tensors alternate between
/// two shards.
pub fn tiny_shards() -> Vec<(String, Vec<u8>)> {
    let tensors = tiny_hf_tensors();
    (0..2)
        .map(|s| {
            let part: Vec<_> = tensors.iter().skip(s).step_by(2).cloned().collect();
            (
                format!("model-0000{}-of-00002.safetensors", s + 1),
                safetensors_file(&part),
            )
        })
        .collect()
}

/// `model.safetensors.index.json` of [`tiny_shards`].
pub fn tiny_index() -> Seed {
    let shards = tiny_shards();
    let map: serde_json::Map<String, serde_json::Value> = tiny_hf_tensors()
        .iter()
        .enumerate()
        .map(|(i, (name, ..))| (name.to_string(), serde_json::Value::String(shards[i % 2].0.clone())))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 1234}, "weight_map": map});
    Seed::new(
        "tiny llama model.safetensors.index.json (two shards)",
        serde_json::to_vec_pretty(&index).unwrap(),
        Syntax::Json,
    )
}

/// `config.json` files: the tiny model's, the committed fixtures' (transformers 4 and 5 RoPE
/// forms, HyperCLOVA X) and a ladimo MoE export's.
pub fn configs() -> Vec<Seed> {
    let moe = r#"{"architectures":["LadimoMoeForCausalLM"],"model_type":"ladimo_moe","hidden_size":8,
"intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"vocab_size":16,
"num_local_experts":4,"num_experts_per_tok":2,"tie_word_embeddings":true,
"ladimo":{"format":1,"base_architecture":"LlamaForCausalLM","dense_intermediate_size":16,"mixtral_exact":false,
"why_not_mixtral":"shared experts","layers":[{"layer":0,"policy":{"type":"TopK","k":2},
"combine":{"weights":"Unit","scale":1.0}},{"layer":1,"policy":{"type":"TopP","p":0.7,"min_k":1,"max_k":3},
"combine":{"weights":"Renormalized","scale":2.0}}]}}"#;
    vec![
        Seed::new("tiny llama config.json", TINY_HF_CONFIG, Syntax::Json),
        Seed::new(
            "tests/fixtures/tiny-llama3/config.json",
            repo_file!("tests/fixtures/tiny-llama3/config.json"),
            Syntax::Json,
        ),
        Seed::new(
            "tests/fixtures/tiny-hcx/config.json",
            repo_file!("tests/fixtures/tiny-hcx/config.json"),
            Syntax::Json,
        ),
        Seed::new(
            "tests/fixtures/tiny-llama-linear/config.json",
            repo_file!("tests/fixtures/tiny-llama-linear/config.json"),
            Syntax::Json,
        ),
        Seed::new("ladimo MoE export config.json", moe, Syntax::Json),
    ]
}

/// `tokenizer.json` files: the committed tiny byte-level BPE, one built from the tiny vocabulary
/// with a Digits + ByteLevel pre-tokenizer, and (in longer runs, when `real` is given) a real one.
pub fn tokenizers(real: Option<Vec<u8>>) -> Vec<Seed> {
    let (tokens, merges, _) = tiny_vocab();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let built = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    let mut seeds = vec![
        Seed::new(
            "tests/fixtures/tiny-llama3/tokenizer.json",
            repo_file!("tests/fixtures/tiny-llama3/tokenizer.json"),
            Syntax::Json,
        ),
        Seed::new(
            "tiny BPE tokenizer.json (Digits + ByteLevel)",
            built.to_string(),
            Syntax::Json,
        ),
    ];
    if let Some(bytes) = real {
        seeds.push(Seed::new("SmolLM2 tokenizer.json", bytes, Syntax::Json));
    }
    seeds
}

/// Policy files as `ladimo solve` and `ladimo sparsify` write them.
pub fn policies() -> Vec<Seed> {
    let moe = r#"model = "3f2a9c0d1e2b4a5c"
note = "solver: 75% of dense FFN parameters"

[[layers]]
layer = 0
policy = { type = "TopK", k = 2 }

[[layers]]
layer = 1
policy = { type = "TopP", p = 0.7, min_k = 1, max_k = 3 }

[[layers]]
layer = 2
policy = { type = "Confidence", tau = 0.6, k_low = 1, k_high = 3 }
"#;
    let dense = r#"model = "00000000deadbeef"
note = "teal at 0.75"

[[layers]]
layer = 0
sparsity = { type = "Teal", x = 0.031, h = 0.0042 }

[[layers]]
layer = 1
sparsity = { type = "Cats", gate = 0.12 }

[[layers]]
layer = 2
sparsity = { type = "Static", keep = [0, 1, 2, 5, 8, 13] }
"#;
    vec![
        Seed::new("MoE routing policies", moe, Syntax::Toml),
        Seed::new("dense sparsity policies", dense, Syntax::Toml),
    ]
}

/// The committed convert configs.
pub fn convert_configs() -> Vec<Seed> {
    vec![
        Seed::new("configs/ci.toml", repo_file!("configs/ci.toml"), Syntax::Toml),
        Seed::new("configs/default.toml", repo_file!("configs/default.toml"), Syntax::Toml),
        Seed::new("configs/quality.toml", repo_file!("configs/quality.toml"), Syntax::Toml),
    ]
}

/// A users' JSONL text file (English, Korean, escapes, extra fields, a blank line).
pub fn jsonl() -> Vec<Seed> {
    let text = concat!(
        "{\"text\": \"It is a truth universally acknowledged.\", \"id\": 1}\n",
        "{\"text\": \"\u{B300}\u{D55C}\u{BBFC}\u{AD6D} \u{D5CC}\u{BC95}\", \"lang\": \"ko\"}\n",
        "\n",
        "{\"text\": \"tab\\there, quote \\\" and \\u00e9\", \"meta\": {\"source\": \"x\", \"n\": [1, 2]}}\n",
        "{\"text\": \"last line\"}\n",
    );
    vec![Seed::new("texts.jsonl", text, Syntax::Jsonl)]
}
