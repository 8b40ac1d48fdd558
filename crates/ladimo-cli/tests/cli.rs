//! The `ladimo` binary: exit codes and messages for good and bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn ladimo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ladimo"))
        .args(args)
        .output()
        .expect("run ladimo")
}

/// This crate's folder in the checkout being tested (`cargo test` sets `CARGO_MANIFEST_DIR` at run
/// time; a shared build cache may hold a binary compiled in another checkout).
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn fixture(name: &str) -> String {
    manifest_dir()
        .join("../../tests/fixtures")
        .join(name)
        .to_string_lossy()
        .into()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into()
}

#[test]
fn inspect_tiny_hyperclovax() {
    let o = ladimo(&["inspect", &fixture("tiny-hcx")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in ["HyperClovaX", "post-norm true", "attention", "ffn", "embeddings", "F32"] {
        assert!(out.contains(want), "inspect output lacks {want:?}:\n{out}");
    }
}

#[test]
fn generate_and_perplexity_run_on_a_tiny_model() {
    let o = ladimo(&[
        "generate",
        &fixture("tiny-llama3"),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("Hello"));
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();
    let o = ladimo(&[
        "perplexity",
        &fixture("tiny-llama3"),
        "--text",
        text.to_str().unwrap(),
        "--seq-len",
        "32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("perplexity: "), "{out}");
}

#[test]
fn bad_input_exits_non_zero_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"NOPE and some more bytes").unwrap();
    let o = ladimo(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("bad.gguf") && e.contains("bad magic"), "{e}");
    assert!(!e.contains("panicked"), "{e}");

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let o = ladimo(&["perplexity", &fixture("tiny-llama3"), "--text", empty.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("empty.txt: the text is empty"), "{}", stderr(&o));

    let binary = dir.path().join("bin.txt");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x80]).unwrap();
    let o = ladimo(&[
        "perplexity",
        &fixture("tiny-llama3"),
        "--text",
        binary.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not UTF-8"), "{}", stderr(&o));

    let o = ladimo(&["inspect", "/no/such/model"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/no/such/model"));
}

/// The "FFN N" of `perplexity`'s parameter line.
fn ffn_active(out: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("active parameters"))
        .expect("parameter line");
    line.rsplit("FFN ").next().unwrap().trim().parse().unwrap()
}

#[test]
fn sparsify_calibrates_teal_inside_an_moe_model_and_perplexity_applies_it() {
    use ladimo_moe::{Combine, CombineWeights, HostFfn, MoeBlock, Policy, save_moe_checkpoint};
    let src = ladimo_io::Checkpoint::open(PathBuf::from(fixture("tiny-llama3"))).unwrap();
    let device = ladimo_backend::device();
    // Both layers cut into 4 experts of 40 neurons, top-2.
    let blocks: Vec<MoeBlock> = (0..2)
        .map(|l| {
            let dense = HostFfn::from_checkpoint(&src, l).unwrap();
            let experts: Vec<HostFfn> = (0..4)
                .map(|e| dense.select_neurons(&(e * 40..(e + 1) * 40).collect::<Vec<_>>()))
                .collect();
            let router = ladimo_io::HostTensor::new(
                vec![4, 64],
                (0..256)
                    .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * (l + 1) as f32)
                    .collect(),
            );
            let combine = Combine {
                weights: CombineWeights::Renormalized,
                scale: 1.0,
            };
            MoeBlock::new(&router, None, &experts, None, combine, Policy::TopK { k: 2 }, &device).unwrap()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let moe = dir.path().join("moe");
    save_moe_checkpoint(&src, &blocks.iter().map(Some).collect::<Vec<_>>(), &moe).unwrap();
    let moe = moe.to_str().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();
    let text = text.to_str().unwrap();
    let policy = dir.path().join("teal.toml");
    let o = ladimo(&[
        "sparsify",
        moe,
        "--method",
        "teal",
        "--budget",
        "0.5",
        "--text",
        text,
        "--tokens-per-file",
        "400",
        "--seq-len",
        "32",
        "--out",
        policy.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let file = std::fs::read_to_string(&policy).unwrap();
    assert_eq!(file.matches("type = \"TopK\"").count(), 2, "{file}");
    assert_eq!(file.matches("type = \"Teal\"").count(), 2, "{file}");
    let ppl = |extra: &[&str]| {
        let mut args = vec!["perplexity", moe, "--text", text, "--seq-len", "32"];
        args.extend_from_slice(extra);
        let o = ladimo(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let plain = ffn_active(&ppl(&[]));
    let teal = ffn_active(&ppl(&["--policy", policy.to_str().unwrap()]));
    // Top-2 of 4 reads about half the experts; TEAL at 0.5 about half of what they hold.
    assert!(
        teal < 0.75 * plain && teal > 0.25 * plain,
        "FFN read with TEAL {teal}, without {plain}"
    );
    // Methods not built inside experts are refused, naming the layer and the method.
    let o = ladimo(&[
        "sparsify",
        moe,
        "--method",
        "cats",
        "--budget",
        "0.5",
        "--text",
        text,
        "--tokens-per-file",
        "400",
        "--seq-len",
        "32",
        "--out",
        policy.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("layer 0: cats inside MoE experts"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn sparsify_polish_writes_a_dense_model_folder_whose_policy_applies() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-llama3");
    // Varied text: 20 windows at least for the held-back KL.
    let words = [
        "river", "stone", "light", "quiet", "seven", "letters", "under", "the", "old", "bridge",
    ];
    let text: String = (0..3000usize)
        .map(|i| format!("{} ", words[(i * 7 + i / 3) % words.len()]))
        .collect();
    let text_file = dir.path().join("t.txt");
    std::fs::write(&text_file, text).unwrap();
    let text_file = text_file.to_str().unwrap();
    let out = dir.path().join("polished");
    let args = |method: &'static str| -> Vec<String> {
        [
            "sparsify",
            &model,
            "--method",
            method,
            "--budget",
            "0.5",
            "--text",
            text_file,
            "--tokens-per-file",
            "400",
            "--seq-len",
            "32",
            "--polish",
            "--train-tokens",
            "1024",
            "--polish-lr",
            "1e-3",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |a: &[String]| ladimo(&a.iter().map(String::as_str).collect::<Vec<_>>());
    // Only TEAL is polished.
    let o = run(&args("cats"));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("TEAL thresholds only"), "{}", stderr(&o));
    assert!(!out.exists());

    let o = run(&args("teal"));
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "policy.toml",
        "polish.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(
        !dir.path().join("polished.work").exists(),
        "the work folder stays behind"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("polish.json")).unwrap()).unwrap();
    let (before, after) = (
        record["polish"]["val_kl_init"].as_f64().unwrap(),
        record["polish"]["val_kl"].as_f64().unwrap(),
    );
    assert!(after < before, "held-back KL {before} -> {after}");
    assert_eq!(record["polished_weights_kept"], serde_json::json!(true));
    // A dense Llama to stock loaders: no ladimo section, the source's architecture.
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(
        config.contains("LlamaForCausalLM") && !config.contains("\"ladimo\""),
        "{config}"
    );
    // The policy applies to the folder and reads about half the FFN.
    let ppl = |extra: &[&str]| {
        let mut a = vec![
            "perplexity",
            out.to_str().unwrap(),
            "--text",
            text_file,
            "--seq-len",
            "32",
        ];
        a.extend_from_slice(extra);
        let o = ladimo(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        ffn_active(&String::from_utf8_lossy(&o.stdout))
    };
    let policy = out.join("policy.toml");
    let (plain, teal) = (ppl(&[]), ppl(&["--policy", policy.to_str().unwrap()]));
    assert!(
        teal < 0.7 * plain && teal > 0.3 * plain,
        "FFN read with TEAL {teal}, without {plain}"
    );
    // A polish that cannot lower the held-back KL (a learning rate of 0 leaves the weights as
    // they were) is not kept: the folder holds TEAL's own model, and says so.
    let unpolished = dir.path().join("unpolished");
    let mut a = args("teal");
    let n = a.len();
    a[n - 1] = unpolished.to_str().unwrap().to_string();
    let lr = a.iter().position(|x| x == "--polish-lr").unwrap();
    a[lr + 1] = "0".to_string();
    let o = run(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(unpolished.join("polish.json")).unwrap()).unwrap();
    assert_eq!(record["polished_weights_kept"], serde_json::json!(false));
    assert!(unpolished.join("policy.toml").is_file());
    // An existing folder is not overwritten.
    let o = run(&args("teal"));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
}
