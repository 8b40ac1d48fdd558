//! `ladimo convert` end to end on the committed tiny model (configs/ci.toml): the output folder,
//! its report, resuming, `--force`, and refusals that leave no output behind.

use std::path::{Path, PathBuf};

use ladimo_convert::{Compute, ConvertArgs, Report};

/// `ladimo_convert::run` on the backend the tests run on.
fn run(a: ConvertArgs) -> anyhow::Result<Report> {
    let device = ladimo_backend::device();
    ladimo_convert::run(
        a,
        &Compute {
            device: &device,
            backend: ladimo_backend::name(),
            progress: &ladimo_convert::Silent,
        },
    )
}

fn ci_config() -> PathBuf {
    ladimo_tests::repo_root().join("configs/ci.toml")
}

fn args(out: &Path, set: &[&str]) -> ConvertArgs {
    ConvertArgs {
        config: Some(ci_config()),
        model: None,
        out: Some(out.to_path_buf()),
        work: None,
        force: false,
        set: set.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn ci_config_converts_the_tiny_model_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-moe");
    let r = run(args(&out, &[])).expect("convert");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "policy.toml",
        "report.md",
        "report.json",
        "plots/frontier.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing from the output");
    }
    // The output loads as a model, with an MoE block in every layer under the solved policies.
    let model = ladimo_moe::load_model(&out, &ladimo_backend::device()).unwrap();
    assert!((0..model.layers.len()).all(|l| ladimo_moe::moe_block(&model, l).is_some()));
    let json: ladimo_convert::Report =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(json.solved.policies.len(), 2);
    assert!(json.moe.active_ffn_params < json.dense.active_ffn_params);
    assert!(json.moe.active_ffn_params <= 0.75 * json.dense.active_ffn_params * 1.001);
    let tags: Vec<&str> = json.ppl.iter().map(|p| p.tag.as_str()).collect();
    assert_eq!(tags, ["en", "en-ood", "ko"], "held-out perplexity per set");
    assert!(json.ppl.iter().all(|p| p.dense.is_finite() && p.moe.is_finite()));
    assert_eq!(json.tasks.len(), 2);
    let stock = std::fs::read_to_string(out.join("stock-export.txt")).unwrap();
    assert_eq!(
        json.stock_export,
        stock.trim(),
        "the report says which stock copy was written"
    );
    // The training-free baselines beside it; TEAL (the default `eval.baseline_tasks`) is also
    // scored on the same zero-shot items.
    let methods: Vec<&str> = json.baselines.iter().map(|b| b.method.name()).collect();
    assert_eq!(methods, ["static", "cats", "teal"]);
    for b in &json.baselines {
        assert_eq!(b.langs.len(), 3, "{}: a PPL per held-out set", b.method.name());
        let want = if b.method.name() == "teal" { 2 } else { 0 };
        assert_eq!(b.tasks.len(), want, "{}: zero-shot tasks", b.method.name());
        assert!(b.tasks.iter().all(|t| t.items == 5 && (0.0..=1.0).contains(&t.primary)));
    }
    assert!(
        std::fs::read_to_string(out.join("report.md"))
            .unwrap()
            .contains("## Headline")
    );
    assert!(!r.times.iter().any(|t| t.earlier));
    // ci.toml polishes the blocks end to end: the held-back KL to the dense model falls.
    let (before, after) = json.stage1_polish_kl.expect("the polish ran");
    assert!(after < before, "polish KL {before} -> {after}");
    assert!(r.times.iter().any(|t| t.stage == "stage 1: end-to-end polish"));
    // ci.toml's polish keeps the teacher's top 128: the student-input stage 1 wrote them for it.
    let work = dir.path().join("tiny-moe.work");
    assert!(work.join("stage1/teacher-top128.safetensors").is_file());

    // Again with --force: stages 1 and 2 come from the work folder, the old output is moved aside
    // (not deleted), and the result is the same.
    let mut a = args(&out, &[]);
    a.force = true;
    let again = run(a).expect("convert again");
    assert!(again.times.iter().any(|t| t.earlier && t.stage.starts_with("stage 1")));
    assert!(again.times.iter().any(|t| t.earlier && t.stage.starts_with("stage 2")));
    assert_eq!(again.ppl[0].moe, r.ppl[0].moe);
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("tiny-moe.replaced-"))
        .collect();
    assert_eq!(aside.len(), 1, "the previous output is kept beside the new one");
    assert!(aside[0].path().join("report.md").is_file());

    // One TopK everywhere (no solver), Mixtral's combine rule and no shared experts: a Hugging
    // Face Mixtral checkpoint. (The default Unit weights are not Mixtral's rule, and Mixtral has no
    // shared experts.) Stage 1 on the teacher's hidden states this time (ci.toml trains on the
    // student's), from a capture, so both ways of training run end to end.
    let mut a = args(
        &out,
        &[
            "stage2.fixed_policy={ type = \"TopK\", k = 3 }",
            "stage1.train.combine={ weights = \"Renormalized\", scale = 3.0 }",
            "stage1.train.shared_fraction=0",
            "stage1.train.inputs=\"teacher\"",
        ],
    );
    a.force = true;
    let fixed = run(a).expect("convert with a fixed policy");
    assert!(fixed.mixtral_exact);
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "MixtralForCausalLM");
    assert_eq!(config["num_experts_per_tok"], 3);
    assert_eq!(config["dtype"], "float32");
}

#[test]
fn an_existing_output_is_refused_without_force_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "the user's").unwrap();
    let e = format!("{:#}", run(args(&out, &[])).unwrap_err());
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "the user's");
    assert!(!dir.path().join("mine.work").exists(), "nothing ran");
}

#[test]
fn bad_input_is_a_clear_error_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    // A model that does not exist.
    let e = format!("{:#}", run(args(&out, &["model=\"/nonexistent/model\""])).unwrap_err());
    assert!(e.contains("/nonexistent/model"), "{e}");
    // A config with an unknown field: the error names the file and the field.
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "model = \"x\"\n[stage1]\ntokenz = 5\n").unwrap();
    let mut a = args(&out, &[]);
    a.config = Some(cfg);
    let e = format!("{:#}", run(a).unwrap_err());
    assert!(e.contains("bad.toml") && e.contains("tokenz"), "{e}");
    // A budget below the cheapest policy: the error names the minimum.
    let e = format!("{:#}", run(args(&out, &["stage2.budget.fraction=0.05"])).unwrap_err());
    assert!(e.contains("minimum") || e.contains("cheapest"), "{e}");
    // A training policy that names more experts than the layer has.
    let e = format!(
        "{:#}",
        run(args(
            &out,
            &["stage1.train.also_train_with=[{ type = \"TopK\", k = 9 }]"]
        ))
        .unwrap_err()
    );
    assert!(e.contains("also_train_with") && e.contains('9'), "{e}");
    let e = format!(
        "{:#}",
        run(args(&out, &["stage1.finetune.policies=[{ type = \"TopK\", k = 9 }]"])).unwrap_err()
    );
    assert!(e.contains("stage1.finetune.policies") && e.contains('9'), "{e}");
    // The KL cost (the default) with the MoE as the probes' context, where no KL is measured.
    let e = format!(
        "{:#}",
        run(args(&out, &["stage2.sensitivity_context=\"moe\""])).unwrap_err()
    );
    assert!(e.contains("sensitivity-kl") && e.contains("sensitivity_context"), "{e}");
    // A model folder whose weights are unreadable.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("config.json"), "{not json").unwrap();
    let e = format!(
        "{:#}",
        run(args(&out, &[&format!("model={:?}", broken.display().to_string())])).unwrap_err()
    );
    assert!(e.contains("config.json"), "{e}");
    assert!(!out.exists(), "no output folder after a failed conversion");
}

#[test]
fn stage_2_teal_candidates_meet_a_budget_routing_alone_cannot() {
    // ci.toml: 4 routed experts of 36 neurons and 16 shared, so top-1 alone reads about a third
    // of the FFN; a quarter needs thresholds inside the experts.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-teal");
    // With the polish under the chosen policies and thresholds (stage2.polish).
    let teal = ["stage2.teal_sparsities=[0.4, 0.7]", "stage2.budget.fraction=0.25"];
    let polish = ["stage2.polish.epochs=1", "stage2.polish.lr=1e-3"];
    let r = run(args(&out, &[&teal[..], &polish[..]].concat())).expect("convert");
    let (before, after, kept) = r.stage2_polish_kl.expect("the polish under the policies ran");
    assert_eq!(kept, after < before, "kept only when the KL fell: {before} -> {after}");
    assert!(
        r.times
            .iter()
            .any(|t| t.stage == "stage 2: polish under the policies" && !t.earlier)
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("The polish under these policies and thresholds"), "{md}");
    let policy = std::fs::read_to_string(out.join("policy.toml")).unwrap();
    assert!(policy.contains("Teal"), "{policy}");
    let split = r
        .solved
        .ffn_saving
        .expect("thresholds were chosen, so the saving is split");
    eprintln!(
        "{split:?}; measured FFN {} of {}",
        r.moe.active_ffn_params, r.dense.active_ffn_params
    );
    assert!(
        split.by_thresholds > 0.0 && split.by_experts_not_read > 0.0,
        "{split:?}"
    );
    // The evaluation ran the thresholds (measured on held-out text, so near the budget, not at it).
    assert!(
        r.moe.active_ffn_params < 0.3 * r.dense.active_ffn_params,
        "{} of {}",
        r.moe.active_ffn_params,
        r.dense.active_ffn_params
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("by experts not read") && md.contains("by TEAL thresholds"),
        "{md}"
    );
    let stock = std::fs::read_to_string(out.join("stock-export.txt")).unwrap();
    assert!(
        stock.contains("No stock format carries TEAL thresholds") && stock.contains("hf-remote"),
        "{stock}"
    );
    // Another polish setting polishes again from the same profile; without the polish the
    // report has none.
    let mut a = args(
        &out,
        &[&teal[..], &["stage2.polish.epochs=1", "stage2.polish.lr=3e-4"][..]].concat(),
    );
    a.force = true;
    let again = run(a).expect("convert with another polish lr");
    let earlier = |r: &Report, stage: &str| r.times.iter().any(|t| t.stage == stage && t.earlier);
    assert!(earlier(&again, "stage 2: profile") && earlier(&again, "stage 2: layer sensitivity"));
    assert!(!earlier(&again, "stage 2: polish under the policies"));
    let mut a = args(&out, &teal);
    a.force = true;
    let off = run(a).expect("convert without the polish");
    assert!(off.stage2_polish_kl.is_none() && earlier(&off, "stage 2: profile"));
}
