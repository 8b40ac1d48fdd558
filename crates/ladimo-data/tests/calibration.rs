//! The token sets threshold calibration and in-the-loop training use come from the calibration
//! files alone: with every held-out file missing they are built all the same, and the training
//! tokens mix both languages to their end.

use std::path::PathBuf;

use ladimo_data::{DataSet, Part, calibration_tokens, take_tokens};

/// This crate's folder in the checkout being tested (`cargo test` sets `CARGO_MANIFEST_DIR` at run
/// time; a shared build cache may hold a binary compiled in another checkout).
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn tokenizer() -> ladimo_io::Tokenizer {
    let dir = manifest_dir().join("../../tests/fixtures/tiny-llama3");
    ladimo_io::Tokenizer::from_hf_dir(&dir).unwrap()
}

#[test]
fn calibration_tokens_never_open_a_held_out_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut en = Vec::new();
    for i in 0..5 {
        let p = dir.path().join(format!("novel{i}.txt"));
        let text: String = (0..400)
            .map(|j| format!("Chapter {i} line {j}: the lady walked to town. "))
            .collect();
        std::fs::write(&p, text).unwrap();
        en.push(p);
    }
    let ko = dir.path().join("help-ko.txt");
    std::fs::write(
        &ko,
        "대한민국은 민주공화국이다. 문서를 저장하려면 파일 메뉴를 누르십시오. ".repeat(300),
    )
    .unwrap();
    // Held-out paths that do not exist: any read of them is an error.
    let data = DataSet {
        calibration_en: en.clone(),
        heldout_en: dir.path().join("missing-persuasion.txt"),
        // Not part of these token sets (yet): a missing file, so a read would fail.
        calibration_en_docs: dir.path().join("missing-help-en.txt"),
        heldout_en_ood: dir.path().join("missing-debian-reference.txt"),
        calibration_ko: ko.clone(),
        heldout_ko: vec![dir.path().join("missing-kolaw.txt")],
        manifest: dir.path().join("missing-manifest.json"),
        sources: Vec::new(),
    };
    let tok = tokenizer();
    let cal = calibration_tokens(&tok, &data, 128, 1280, 0.2, 64).unwrap();
    assert_eq!(cal.tails.len(), 6);
    for (t, f) in cal.tails.iter().zip(en.iter().chain([&ko])) {
        assert_eq!(*t, take_tokens(&tok, std::slice::from_ref(f), 128, Part::Tail).unwrap());
    }
    assert_eq!(cal.train.len(), 1280);
    // Korean windows are spread to the end: one in the last 8 of the 20 windows (a trainer holds
    // back the tail to measure).
    let ko_head = take_tokens(&tok, std::slice::from_ref(&ko), 256, Part::Head).unwrap();
    let tail = &cal.train[768..];
    let has = |w: &[u32]| tail.chunks(64).any(|c| c == w);
    assert!(ko_head.chunks(64).any(has), "no Korean window near the end");
    let en_head = take_tokens(&tok, &en, 1024, Part::Head).unwrap();
    assert!(en_head.chunks(64).any(has), "no English window near the end");
    assert!(!data.heldout_en.exists() && !data.heldout_ko[0].exists() && !data.heldout_en_ood.exists());
}
