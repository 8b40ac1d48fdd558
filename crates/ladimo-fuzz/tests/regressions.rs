//! One test per parser bug the fuzz targets found: each input used to panic (or reach past the
//! model's folder) and must now be refused with an error that names the file and the problem.

use std::path::Path;

use ladimo_fuzz::driver::{alloc_limit, check};
use ladimo_fuzz::mutate::FieldKind;
use ladimo_fuzz::seeds::{self, Meta};
use ladimo_fuzz::{Outcome, Target};
use ladimo_io::{Checkpoint, GgufFile, Tokenizer, WeightSource};

/// Write `bytes` as `model.gguf` in a new folder; the folder and the file's path.
fn gguf_file(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// The error of `r`, as text, or a panic naming what was expected.
fn err<T>(r: ladimo_io::Result<T>, what: &str) -> String {
    match r {
        Ok(_) => panic!("{what}: expected an error"),
        Err(e) => e.to_string(),
    }
}

/// The tiny GGUF with its `i`-th field of `kind` set to `value`.
fn gguf_with_field(kind: FieldKind, i: usize, value: u64) -> Vec<u8> {
    let seed = seeds::tiny_gguf();
    let f = seed
        .fields
        .iter()
        .filter(|f| f.kind == kind)
        .nth(i)
        .expect("such a field");
    let mut bytes = seed.bytes.clone();
    bytes[f.offset..f.offset + f.width].copy_from_slice(&value.to_le_bytes()[..f.width]);
    bytes
}

#[test]
fn gguf_tensor_dims_whose_product_overflows_are_refused() {
    // token_embd's dims [8, vocab] -> [8, 2^62]: 8 * 2^62 wrapped to 0 and the range check passed.
    let (_d, path) = gguf_file(&gguf_with_field(FieldKind::Dim, 1, 1 << 62));
    let e = err(GgufFile::open(&path), "dims 8 x 2^62");
    assert!(
        e.contains("model.gguf") && e.contains("token_embd.weight") && e.contains("does not fit"),
        "{e}"
    );
}

#[test]
fn gguf_tensor_offset_past_usize_is_refused() {
    let (_d, path) = gguf_file(&gguf_with_field(FieldKind::Offset, 0, u64::MAX - 31));
    let e = err(GgufFile::open(&path), "offset near 2^64");
    assert!(e.contains("token_embd.weight") && e.contains("does not fit"), "{e}");
}

#[test]
fn gguf_counts_larger_than_the_file_are_refused_before_allocating() {
    for (field, value) in [(0, 1u64 << 40), (1, 900_000)] {
        let (_d, path) = gguf_file(&gguf_with_field(FieldKind::Count, field, value));
        let e = err(GgufFile::open(&path), "huge header count");
        assert!(e.contains("more than the") && e.contains("bytes of the file"), "{e}");
    }
    // The tokens array (the first array count) claims 2^40 items.
    let seed = seeds::tiny_gguf();
    let tokens_count = seed
        .fields
        .iter()
        .filter(|f| f.kind == FieldKind::Count && f.width == 8)
        .nth(2)
        .unwrap();
    let mut bytes = seed.bytes.clone();
    bytes[tokens_count.offset..tokens_count.offset + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let (_d, path) = gguf_file(&bytes);
    let e = err(GgufFile::open(&path), "array of 2^40 items");
    assert!(
        e.contains("metadata array of 1099511627776 items") && e.contains("does not fit"),
        "{e}"
    );
}

#[test]
fn gguf_alignment_must_be_a_small_power_of_two() {
    for bad in [0u32, 3, 48, 1 << 30] {
        let seed = seeds::tiny_gguf_with(|m| {
            m.iter_mut().find(|(k, _)| *k == "general.alignment").unwrap().1 = Meta::U32(bad)
        });
        let (_d, path) = gguf_file(&seed.bytes);
        let e = err(GgufFile::open(&path), "bad alignment");
        assert!(
            e.contains(&format!("general.alignment = {bad}")) && e.contains("power of two"),
            "{e}"
        );
    }
}

#[test]
fn gguf_negative_sizes_are_refused() {
    let seed = seeds::tiny_gguf_with(|m| {
        m.iter_mut().find(|(k, _)| *k == "llama.embedding_length").unwrap().1 = Meta::I32(-1);
    });
    let (_d, path) = gguf_file(&seed.bytes);
    let file = GgufFile::open(&path).unwrap();
    let e = err(file.model_config(), "embedding_length -1");
    assert!(e.contains("llama.embedding_length") && e.contains("= -1"), "{e}");
}

#[test]
fn gguf_head_counts_that_do_not_divide_q_and_k_are_refused() {
    // 8 rows of attn_q: 3 heads do not divide them; 0 heads divided by zero.
    for heads in [3u32, 0] {
        let seed = seeds::tiny_gguf_with(|m| {
            m.iter_mut()
                .find(|(k, _)| *k == "llama.attention.head_count")
                .unwrap()
                .1 = Meta::U32(heads);
        });
        let (_d, path) = gguf_file(&seed.bytes);
        let weights = GgufFile::open(&path).unwrap().into_weights();
        let e = err(weights.load("model.layers.0.self_attn.q_proj.weight"), "bad head count");
        assert!(
            e.contains("attn_q.weight") && e.contains(&format!("not {heads} heads")),
            "{e}"
        );
    }
}

#[test]
fn gguf_token_types_must_match_the_tokens() {
    // One more token type than tokens: `tokens[i]` was indexed past the end.
    let seed = seeds::tiny_gguf_with(|m| {
        let types = m.iter_mut().find(|(k, _)| *k == "tokenizer.ggml.token_type").unwrap();
        if let Meta::I32s(t) = &mut types.1 {
            t.push(3);
        }
    });
    let (_d, path) = gguf_file(&seed.bytes);
    let file = GgufFile::open(&path).unwrap();
    let e = err(Tokenizer::from_gguf(&file), "token types longer than tokens");
    assert!(
        e.contains("token_type` has 17 entries but `tokenizer.ggml.tokens` has 16"),
        "{e}"
    );
}

/// A folder with the tiny model's config.json and `model.safetensors` = `bytes`.
fn hf_dir(bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), seeds::TINY_HF_CONFIG).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    dir
}

/// A safetensors file whose header is `header` followed by `data_len` zero bytes.
fn safetensors_with_header(header: &str, data_len: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(vec![0u8; data_len]);
    b
}

#[test]
fn safetensors_offsets_and_shapes_that_overflow_are_refused() {
    // An end offset near 2^64 wrapped around; a shape whose product wraps to the data size.
    let cases = [
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}}"#,
            "past the end of the file",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,8]}}"#,
            "bytes of data for shape",
        ),
    ];
    for (header, expect) in cases {
        let dir = hf_dir(&safetensors_with_header(header, 8));
        let e = err(Checkpoint::open(dir.path()), header);
        assert!(
            e.contains("model.safetensors") && e.contains("tensor `w`") && e.contains(expect),
            "{e}"
        );
    }
}

#[test]
fn safetensors_index_may_not_name_files_outside_the_model_folder() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("config.json"), seeds::TINY_HF_CONFIG).unwrap();
    std::fs::write(root.path().join("outside.safetensors"), seeds::tiny_safetensors().bytes).unwrap();
    for shard in ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", ".."] {
        let index = serde_json::json!({"weight_map": {"model.norm.weight": shard}});
        std::fs::write(model.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let e = err(Checkpoint::open(&model), shard);
        assert!(
            e.contains("model.safetensors.index.json")
                && e.contains(&format!("{shard:?}"))
                && e.contains("not a file name"),
            "{e}"
        );
    }
}

#[test]
fn tokenizer_json_with_a_broken_decoder_is_an_error_not_a_panic() {
    // The tokenizers crate `expect`s its decoder section to parse; a syntax error there panicked.
    let good = include_str!("../../../tests/fixtures/tiny-llama3/tokenizer.json");
    let at = good.find("\"decoder\":{").expect("the fixture has a decoder") + "\"decoder\":{".len();
    let broken = format!(
        "{}\"type\" \"ByteLevel\",{}",
        &good[..at],
        &good[at + "\"type\":\"ByteLevel\",".len()..]
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), broken).unwrap();
    let e = err(Tokenizer::from_hf_dir(dir.path()), "decoder syntax error");
    assert!(e.contains("tokenizer.json") && e.contains("not valid JSON"), "{e}");
}

/// A target whose parser allocates one byte more than the limit allows.
fn greedy_target() -> Target {
    Target {
        name: "greedy",
        about: "allocates past the limit",
        seeds: |_| vec![],
        write: |dir, b| {
            std::fs::write(dir.join("in"), b)?;
            Ok(b.len())
        },
        parse: |dir: &Path| {
            let n = std::fs::metadata(dir.join("in")).unwrap().len() as usize;
            let v: Vec<u8> = Vec::with_capacity(alloc_limit(n) + 1);
            std::hint::black_box(&v);
            Outcome::Accepted
        },
    }
}

#[test]
fn the_driver_reports_allocations_over_the_limit_and_panics() {
    let dir = tempfile::tempdir().unwrap();
    let e = check(&greedy_target(), dir.path(), b"12345", 7).unwrap_err();
    assert!(e.contains(&format!("allocated {} bytes", alloc_limit(5) + 1)), "{e}");
    let panicky = Target {
        parse: |_| panic!("boom"),
        ..greedy_target()
    };
    let e = check(&panicky, dir.path(), b"x", 8).unwrap_err();
    assert!(e.starts_with("panic: boom"), "{e}");
    // Outside a case there is no limit.
    let v: Vec<u8> = Vec::with_capacity(alloc_limit(5) + 1);
    std::hint::black_box(&v);
    assert_eq!(ladimo_backend::alloc_limit::take_violation(), None);
}
