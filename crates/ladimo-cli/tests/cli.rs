//! The `ladimo` binary: exit codes and messages for good and bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn ladimo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ladimo"))
        .args(args)
        .output()
        .expect("run ladimo")
}

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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
