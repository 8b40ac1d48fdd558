//! Helpers shared by the workspace-level tests: fixture paths, reading reference tensors, the real
//! model (fetched on first use), and writers for deliberately broken checkpoints.

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

/// The root of the checkout being tested. `cargo test` sets `CARGO_MANIFEST_DIR` (the running
/// test's own package) when it runs a test, and that wins over the path compiled in: a build cache
/// shared by two checkouts of the same commit (a session's and CI's fresh clone) reuses test
/// binaries compiled in the other one, whose compiled-in path may not exist here. The root is the
/// first folder upwards that holds `Cargo.lock`.
pub fn repo_root() -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    start
        .ancestors()
        .find(|d| d.join("Cargo.lock").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// `tests/fixtures/<name>`; `$LADIMO_FIXTURES/<name>` when that is set (test binaries run on
/// another machine, by scripts/gpu_check.sh).
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("LADIMO_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => repo_root().join("tests/fixtures").join(name),
    }
}

/// Panics unless files `a` and `b` hold the same bytes (e.g. a resumed run's output against an
/// uninterrupted one's); `what` names the pair in the message.
pub fn assert_same_bytes(a: &Path, b: &Path, what: &str) {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(read(a) == read(b), "{what}: {} and {} differ", a.display(), b.display());
}

/// A reference safetensors file, read whole.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn open(path: &Path) -> Self {
        Self {
            bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("reference safetensors")
    }

    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = self.view();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("no tensor {name}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }

    pub fn ids(&self, name: &str) -> (Vec<usize>, Vec<u32>) {
        let st = self.view();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("no tensor {name}"));
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
        let v = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect();
        (t.shape().to_vec(), v)
    }
}

/// The real SmolLM2-135M GGUF, fetched into the cache if missing.
pub fn smollm2() -> PathBuf {
    ladimo_io::fetch::fetch_model(&ladimo_io::fetch::SMOLLM2_135M).expect("fetch smollm2-135m")
}

/// The real model loaded once per test binary on the default device (shared by its tests).
pub struct Smol {
    pub ckpt: ladimo_io::Checkpoint,
    pub model: ladimo_model::Transformer,
}

pub fn smol() -> &'static Smol {
    static S: std::sync::OnceLock<Smol> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let ckpt = ladimo_io::Checkpoint::open(smollm2()).expect("open smollm2");
        let model = ladimo_model::Transformer::from_checkpoint(&ckpt, &ladimo_backend::device()).expect("load smollm2");
        Smol { ckpt, model }
    })
}

/// The real input of SmolLM2's layer `layer` FFN on `text` ([`smol`]): `[tokens, hidden]`.
pub fn smol_ffn_input(text: &str, layer: usize) -> burn::tensor::Tensor<2> {
    let s = smol();
    let ids = s.ckpt.tokenizer().unwrap().encode(text).unwrap();
    let mut h = s.model.embed(ladimo_model::util::ids_tensor(&ids, 1, &s.model.device));
    for l in &s.model.layers[..layer] {
        h = l.forward(h, &s.model.rope, &mut None).unwrap();
    }
    let (_, x) = s.model.layers[layer].attention_part(h, &s.model.rope, &mut None);
    let [b, t, d] = x.dims();
    x.reshape([b * t, d])
}

/// The largest absolute difference relative to the largest magnitude in `want`.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    max_abs_diff(got, want) / scale
}

/// Largest absolute difference between two slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Copy a fixture directory into a fresh temporary directory (to break it there).
pub fn copy_fixture_dir(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
        }
    }
    tmp
}

/// A minimal GGUF writer for tests: metadata (strings and u32s) and raw tensors.
pub struct GgufBuilder {
    pub version: u32,
    kv: Vec<(String, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl Default for GgufBuilder {
    fn default() -> Self {
        Self {
            version: 3,
            kv: vec![],
            tensors: vec![],
        }
    }
}

fn gguf_str(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend(s.as_bytes());
    v
}

impl GgufBuilder {
    pub fn str(mut self, k: &str, v: &str) -> Self {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend(gguf_str(v));
        self.kv.push((k.into(), b));
        self
    }
    pub fn u32(mut self, k: &str, v: u32) -> Self {
        let mut b = 4u32.to_le_bytes().to_vec();
        b.extend(v.to_le_bytes());
        self.kv.push((k.into(), b));
        self
    }
    pub fn f32(mut self, k: &str, v: f32) -> Self {
        let mut b = 6u32.to_le_bytes().to_vec();
        b.extend(v.to_le_bytes());
        self.kv.push((k.into(), b));
        self
    }
    /// `dims` ne0-first, as GGUF stores them.
    pub fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) -> Self {
        self.tensors.push((name.into(), dims.to_vec(), ggml_type, data));
        self
    }
    /// Metadata of a tiny llama (hidden 8, ffn 16, 2 heads, 1 layer, vocab 4).
    pub fn tiny_llama() -> Self {
        Self::default()
            .str("general.architecture", "llama")
            .u32("llama.embedding_length", 8)
            .u32("llama.feed_forward_length", 16)
            .u32("llama.block_count", 1)
            .u32("llama.attention.head_count", 2)
            .u32("llama.attention.head_count_kv", 2)
            .u32("llama.vocab_size", 4)
            .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    }
    pub fn build(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            b.extend(gguf_str(k));
            b.extend(v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            b.extend(gguf_str(name));
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        for (_, _, _, data) in &self.tensors {
            let mut d = data.clone();
            d.resize(data.len().div_ceil(32) * 32, 0);
            b.extend(d);
        }
        b
    }
}

/// A host tensor of `shape` with values uniform in `[-scale, scale)`.
pub fn random_host(rng: &mut impl rand::Rng, shape: Vec<usize>, scale: f32) -> ladimo_io::HostTensor {
    let n = shape.iter().product();
    ladimo_io::HostTensor::new(shape, (0..n).map(|_| rng.random_range(-scale..scale)).collect())
}

/// A random SwiGLU FFN in Hugging Face layout (gate/up `[inter, hidden]`, down `[hidden, inter]`),
/// values in `[-0.5, 0.5)`: the tiny blocks of the MoE tests.
pub fn random_ffn(rng: &mut impl rand::Rng, inter: usize, hidden: usize) -> ladimo_moe::HostFfn {
    ladimo_moe::HostFfn {
        gate: random_host(rng, vec![inter, hidden], 0.5),
        up: random_host(rng, vec![inter, hidden], 0.5),
        down: random_host(rng, vec![hidden, inter], 0.5),
    }
}
