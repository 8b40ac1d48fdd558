//! The conversion config: one TOML file (`configs/*.toml`), every field documented and defaulted,
//! unknown fields refused. [`ConvertConfig::default`] is `configs/default.toml` (a test keeps
//! the two equal), so `ladimo convert` without a config runs the same job as `cargo xtask convert`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ladimo_distill::finetune::FinetuneConfig;
use ladimo_distill::train::TrainConfig;
use ladimo_moe::Policy;
use ladimo_profile::{Budget, Cost, ProfileConfig, SensitivityContext};
use serde::{Deserialize, Serialize};

/// Everything `convert` does, in pipeline order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConvertConfig {
    /// The dense checkpoint: a Hugging Face folder (config.json, *.safetensors, tokenizer.json),
    /// a `.gguf` file, or a known model name (`smollm2-135m`, fetched on first use). A relative
    /// path is relative to the config file.
    pub model: String,
    pub data: DataConfig,
    pub stage1: Stage1Config,
    pub stage2: Stage2Config,
    pub eval: EvalConfig,
}

impl Default for ConvertConfig {
    fn default() -> Self {
        Self {
            model: "smollm2-135m".into(),
            data: DataConfig::default(),
            stage1: Stage1Config::default(),
            stage2: Stage2Config::default(),
            eval: EvalConfig::default(),
        }
    }
}

/// Text by language tag. Empty lists mean the fetched default sets (`cargo xtask fetch data`):
/// calibration en = five Austen novels, ko = LibreOffice help pages; held out en = Persuasion,
/// ko = the Korean constitution and bills.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub calibration: Vec<TextSet>,
    pub heldout: Vec<TextSet>,
    /// With `calibration` empty: the Korean set's share of `stage1.tokens` (the English set has
    /// the rest). Calibrate in the proportions the model will serve.
    pub default_ko_share: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            calibration: Vec::new(),
            heldout: Vec::new(),
            default_ko_share: 0.2,
        }
    }
}

/// Files of one language (`.txt`: one document; `.jsonl`: `{"text": ...}` per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSet {
    /// A language or domain tag (`en`, `ko`, ...); stage 2 reports routing per tag.
    pub tag: String,
    pub files: Vec<PathBuf>,
    /// Calibration only: this set's share of `stage1.tokens` (shares are normalised to sum 1).
    #[serde(default = "one")]
    pub share: f64,
}

fn one() -> f64 {
    1.0
}

/// Stage 1: capture the teacher's FFN inputs/outputs, cut each FFN into experts, distil each block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stage1Config {
    /// Calibration tokens for distillation, taken from the head of the calibration files.
    pub tokens: usize,
    /// Window length of the teacher passes.
    pub seq_len: usize,
    /// Keep the captured activations in the work folder after stage 1 (they are large:
    /// 2 x tokens x hidden x 2 bytes per layer; 6.9 GB for SmolLM2 with 100K tokens).
    pub keep_capture: bool,
    /// How each layer is cut and trained (`ladimo_distill::train::TrainConfig`): experts,
    /// shared_fraction, strategy (contiguous|random|kmeans|coactivation), seed,
    /// train_policy = { type = "TopK", k = 6 }, combine = { weights = "Renormalized", scale = 6.0 },
    /// epochs, batch_tokens, lr, warmup_frac, min_lr_frac, weight_decay, cosine_weight, val_frac,
    /// log_every, router_init_std, router_norm_weight, router_norm_temp.
    pub train: TrainConfig,
    /// The optional end-to-end polish after the layer-wise pass
    /// (`ladimo_distill::finetune::FinetuneConfig`; `epochs = 0` skips it).
    pub finetune: FinetuneConfig,
}

impl Default for Stage1Config {
    fn default() -> Self {
        Self {
            tokens: 100_000,
            seq_len: 512,
            keep_capture: false,
            train: TrainConfig::default(),
            finetune: FinetuneConfig {
                policies: [4, 3, 5].map(|k| Policy::TopK { k }).to_vec(),
                ..FinetuneConfig::default()
            },
        }
    }
}

/// Stage 2: profile the routers on calibration text (the tail of the calibration files, away
/// from what stage 1 trained on) and choose one routing policy per layer within a budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stage2Config {
    /// What to profile and how (`ladimo_profile::ProfileConfig`, its fields directly under
    /// `[stage2]`): tokens, seq_len, top_p_grid, tau_grid, latency_tokens, latency_repeats,
    /// uniform_k, sensitivity_k, sensitivity_tokens, sensitivity_context, teal_sparsities
    /// (candidates with TEAL thresholds inside the experts; here 0.1 to 0.5, where
    /// `ladimo profile` leaves them out).
    #[serde(flatten)]
    pub profile: ProfileConfig,
    /// What the chosen policies may activate (`ladimo_profile::Budget`): `of` = ffn-params,
    /// params or latency; `fraction` of the dense value, or `max` (absolute).
    pub budget: Budget,
    /// The per-layer cost the solver minimises: sensitivity (the measured ln-PPL changes,
    /// interpolated by experts run), sensitivity-kl (the same probes' KL to the dense model),
    /// sensitivity-linear, rel-mse or resid-mse.
    pub cost: Cost,
    /// Skip the solver and give every MoE layer this policy, e.g. `{ type = "TopK", k = 6 }`
    /// (with renormalised combine weights that makes a Hugging Face Mixtral checkpoint). The
    /// budget is then only reported against.
    pub fixed_policy: Option<Policy>,
    /// After solving: every block polished end to end (KL to the dense model, on stage 1's
    /// calibration windows) under the policies and thresholds stage 2 chose
    /// (`ladimo_distill::finetune::finetune_under`; `epochs = 0` skips it, `policies` must be
    /// empty). The polished blocks replace the stage-1 ones only when the held-back KL fell.
    pub polish: FinetuneConfig,
}

impl Default for Stage2Config {
    fn default() -> Self {
        Self {
            profile: ProfileConfig {
                teal_sparsities: vec![0.1, 0.2, 0.3, 0.4, 0.5],
                ..ProfileConfig::default()
            },
            budget: Budget::default(),
            cost: Cost::SensitivityKl,
            fixed_policy: None,
            polish: FinetuneConfig {
                epochs: 1,
                max_steps: 30,
                lr: 1e-4,
                teacher_top_k: 128,
                ..FinetuneConfig::default()
            },
        }
    }
}

/// What the report measures, dense and MoE side by side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Held-out perplexity: tokens per held-out tag (windows of `seq_len`).
    pub ppl_tokens: usize,
    pub seq_len: usize,
    /// Zero-shot tasks (arc_easy, arc_challenge, piqa, hellaswag) and items per task.
    pub tasks: Vec<String>,
    pub task_limit: usize,
    /// Speed: prefill of one prompt of `prefill_tokens`, then `decode_tokens` decoded one by one
    /// (median of `speed_repeats`).
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub speed_repeats: usize,
    /// Training-free baselines scored beside the MoE at its FFN share (static, cats, teal).
    pub baselines: Vec<ladimo_moe::SparsityMethod>,
    /// Of those, the ones also scored on the zero-shot tasks (each costs about as long as the
    /// dense model's zero-shot scoring).
    pub baseline_tasks: Vec<ladimo_moe::SparsityMethod>,
    /// The weights' type for the whole evaluation, as `ladimo ... --dtype`: f32 (kept as they
    /// are), f16 or bf16 (rounded as they load: perplexity, tasks and baselines in 16 bits).
    /// The speed rows always decode on the host kernels (ladimo-kernel) with weights stored in
    /// this type.
    #[serde(with = "dtype_name")]
    pub dtype: ladimo_model::Dtype,
}

/// A [`ladimo_model::Dtype`] as its name (`f32`, `f16`, `bf16`) in the config file.
mod dtype_name {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &ladimo_model::Dtype, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(d.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ladimo_model::Dtype, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            ppl_tokens: 16_384,
            seq_len: 512,
            tasks: ladimo_data::Task::ALL.iter().map(|t| t.name().to_string()).collect(),
            task_limit: 500,
            prefill_tokens: 256,
            decode_tokens: 32,
            speed_repeats: 3,
            baselines: ladimo_moe::SparsityMethod::ALL.to_vec(),
            baseline_tasks: vec![ladimo_moe::SparsityMethod::Teal],
            dtype: ladimo_model::Dtype::F32,
        }
    }
}

impl ConvertConfig {
    /// Read a config file, apply `overrides` (`section.key=value`, the value in TOML syntax),
    /// resolve relative paths against the file's folder, and check it.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let (mut value, base) = match path {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).with_context(|| format!("{}: cannot read the config", p.display()))?;
                let v: toml::Table =
                    toml::from_str(&text).with_context(|| format!("{}: not valid TOML", p.display()))?;
                let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
                (v, base)
            }
            None => (toml::Table::new(), PathBuf::from(".")),
        };
        for o in overrides {
            set_override(&mut value, o).with_context(|| format!("--set {o}"))?;
        }
        let name = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the built-in default config".into());
        let mut cfg: ConvertConfig =
            ConvertConfig::deserialize(value.clone()).with_context(|| format!("{name}: invalid config"))?;
        let read = toml::Table::try_from(&cfg).context("serializing the config")?;
        let mut unknown = Vec::new();
        unknown_keys(&value, &read, "", &mut unknown);
        if !unknown.is_empty() {
            // A field set to what its serialization skips (e.g. `teal_sparsities = []`) is
            // absent from `read`; the built-in default names it.
            let known = toml::Table::try_from(ConvertConfig::default()).context("serializing the default")?;
            let mut not_in_default = Vec::new();
            unknown_keys(&value, &known, "", &mut not_in_default);
            unknown.retain(|k| not_in_default.contains(k));
        }
        if !unknown.is_empty() {
            bail!("{name}: invalid config: unknown field(s) {}", unknown.join(", "));
        }
        cfg.resolve_paths(&base);
        cfg.check().with_context(|| format!("{name}: invalid config"))?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let known = ladimo_io::fetch::known_model(&self.model).is_ok();
        if !known && Path::new(&self.model).is_relative() {
            self.model = base.join(&self.model).to_string_lossy().into_owned();
        }
        for set in self.data.calibration.iter_mut().chain(self.data.heldout.iter_mut()) {
            for f in &mut set.files {
                if f.is_relative() {
                    *f = base.join(&*f);
                }
            }
        }
    }

    /// Refuse settings that cannot work, before anything long runs.
    pub fn check(&self) -> Result<()> {
        self.stage2
            .budget
            .check()
            .map_err(|e| anyhow::anyhow!("stage2.budget: {e}"))?;
        let s1 = &self.stage1;
        if s1.seq_len == 0 || s1.tokens < s1.seq_len {
            bail!(
                "stage1.tokens ({}) must hold at least one window of stage1.seq_len ({})",
                s1.tokens,
                s1.seq_len
            );
        }
        if s1.train.experts < 2 {
            bail!("stage1.train.experts = {}: need at least 2", s1.train.experts);
        }
        let policies = std::iter::once(("train_policy", &s1.train.train_policy))
            .chain(s1.train.also_train_with.iter().map(|p| ("also_train_with", p)));
        for (field, p) in policies {
            use ladimo_moe::RoutingPolicy;
            p.validate(s1.train.experts)
                .map_err(|e| anyhow::anyhow!("stage1.train.{field}: {p}: {e}"))?;
        }
        if s1.finetune.epochs > 0 {
            s1.finetune
                .check(s1.train.experts, s1.tokens / s1.seq_len, s1.seq_len)
                .map_err(|e| anyhow::anyhow!("stage1.finetune.{e}"))?;
        }
        let polish = &self.stage2.polish;
        if polish.epochs > 0 {
            polish
                .check_run(s1.tokens / s1.seq_len, s1.seq_len)
                .map_err(|e| anyhow::anyhow!("stage2.polish.{e}"))?;
            if !polish.policies.is_empty() {
                bail!("stage2.polish.policies: must be [] (the polish trains under the policies stage 2 chose)");
            }
        }
        let p = &self.stage2.profile;
        if p.tokens < p.seq_len {
            bail!(
                "stage2.tokens ({}) is shorter than one window ({})",
                p.tokens,
                p.seq_len
            );
        }
        p.check_teal().map_err(|e| anyhow::anyhow!("stage2.{e}"))?;
        if self.stage2.cost.is_ln_ppl() && !p.measures_sensitivity() {
            bail!(
                "stage2.cost = {:?} needs stage2.sensitivity_k (the probes it is made of)",
                self.stage2.cost
            );
        }
        if self.stage2.cost == Cost::SensitivityKl && p.sensitivity_context != SensitivityContext::Dense {
            bail!(
                "stage2.cost = \"sensitivity-kl\" needs stage2.sensitivity_context = \"dense\" (the KL is \
                 measured against the dense model)"
            );
        }
        if self.eval.ppl_tokens < self.eval.seq_len {
            bail!(
                "eval.ppl_tokens ({}) is shorter than one window ({})",
                self.eval.ppl_tokens,
                self.eval.seq_len
            );
        }
        for t in &self.eval.tasks {
            t.parse::<ladimo_data::Task>()
                .map_err(anyhow::Error::msg)
                .context("eval.tasks")?;
        }
        let ko = self.data.default_ko_share;
        if !(ko > 0.0 && ko < 1.0) {
            bail!("data.default_ko_share = {ko}: expected a number between 0 and 1 (both ends excluded)");
        }
        if !self.data.calibration.is_empty() && ko != DataConfig::default().default_ko_share {
            bail!(
                "data.default_ko_share = {ko} applies to the fetched default text sets only; \
                 with [[data.calibration]] tables give each set's `share`"
            );
        }
        for set in self.data.calibration.iter().chain(&self.data.heldout) {
            if set.tag.is_empty() || set.tag == "all" {
                bail!("data: a text set's tag must be a non-empty name other than `all`");
            }
            if set.files.is_empty() {
                bail!("data: text set `{}` names no files", set.tag);
            }
            if set.share.is_nan() || set.share <= 0.0 {
                bail!("data: text set `{}` has share {}; expected > 0", set.tag, set.share);
            }
        }
        if self.eval.prefill_tokens < 17 {
            bail!("eval.prefill_tokens must be at least 17 (decode starts after a 16-token prompt)");
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// Keys of `given` (the file) that `read` (the config as read, serialized back) lacks: fields no
/// struct took. Serde's `deny_unknown_fields` does this for most tables but cannot see through
/// `[stage2]`, whose profiling settings are a flattened struct of ladimo-profile.
fn unknown_keys(given: &toml::Table, read: &toml::Table, at: &str, out: &mut Vec<String>) {
    for (k, v) in given {
        let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
        match (v, read.get(k)) {
            (_, None) => out.push(format!("`{path}`")),
            (toml::Value::Table(g), Some(toml::Value::Table(r))) => unknown_keys(g, r, &path, out),
            (toml::Value::Array(g), Some(toml::Value::Array(r))) => {
                for (i, (g, r)) in g.iter().zip(r).enumerate() {
                    if let (toml::Value::Table(g), toml::Value::Table(r)) = (g, r) {
                        unknown_keys(g, r, &format!("{path}[{i}]"), out);
                    }
                }
            }
            _ => {}
        }
    }
}

/// `a.b.c=VALUE`: set a nested key; VALUE is parsed as TOML (`0.7`, `true`, `"x"`, `[4, 5]`), and
/// taken as a string when it does not parse.
fn set_override(root: &mut toml::Table, o: &str) -> Result<()> {
    let (key, val) = o.split_once('=').context("expected KEY=VALUE")?;
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {val}")) {
        Ok(mut t) => t.remove("v").expect("parsed"),
        Err(_) => toml::Value::String(val.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut table = root;
    for p in &parts[..parts.len() - 1] {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().with_context(|| format!("`{p}` is not a table"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs() -> PathBuf {
        // `cargo test` sets it at run time: the checkout being tested, even when a shared build
        // cache holds this binary from another one.
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
            .join("../../configs")
    }

    #[test]
    fn default_toml_equals_the_built_in_default() {
        let mut from_file = ConvertConfig::load(Some(&configs().join("default.toml")), &[]).unwrap();
        from_file.model = "smollm2-135m".into();
        assert_eq!(from_file, ConvertConfig::default());
    }

    #[test]
    fn every_shipped_config_parses() {
        for e in std::fs::read_dir(configs()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                ConvertConfig::load(Some(&p), &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            }
        }
    }

    #[test]
    fn unknown_fields_and_impossible_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[stage2.budget]\nfracton = 0.5\n").unwrap();
        let e = format!("{:#}", ConvertConfig::load(Some(&p), &[]).unwrap_err());
        assert!(e.contains("c.toml") && e.contains("fracton"), "{e}");
        // Also directly under [stage2], whose profiling settings are a flattened struct.
        std::fs::write(&p, "[stage2]\nsensitivity_tokns = 512\n").unwrap();
        let e = format!("{:#}", ConvertConfig::load(Some(&p), &[]).unwrap_err());
        assert!(e.contains("c.toml") && e.contains("stage2.sensitivity_tokns"), "{e}");
        // The weights' type for the evaluation: a known name loads, another is refused by name.
        std::fs::write(&p, "[eval]\ndtype = \"f32\"\n").unwrap();
        ConvertConfig::load(Some(&p), &[]).unwrap();
        std::fs::write(&p, "[eval]\ndtype = \"f8\"\n").unwrap();
        let e = format!("{:#}", ConvertConfig::load(Some(&p), &[]).unwrap_err());
        assert!(e.contains("f8"), "{e}");
        std::fs::write(&p, "[stage1.train]\nexperts = 8\nlearning_rate = 1\n").unwrap();
        let e = format!("{:#}", ConvertConfig::load(Some(&p), &[]).unwrap_err());
        assert!(e.contains("learning_rate"), "{e}");
        let e = format!(
            "{:#}",
            ConvertConfig::load(None, &["stage2.budget.fraction=1.5".into()]).unwrap_err()
        );
        assert!(e.contains("fraction = 1.5"), "{e}");
        let e = format!(
            "{:#}",
            ConvertConfig::load(None, &["eval.tasks=[\"mmlu\"]".into()]).unwrap_err()
        );
        assert!(e.contains("mmlu"), "{e}");
        let e = format!(
            "{:#}",
            ConvertConfig::load(None, &["data.default_ko_share=1.0".into()]).unwrap_err()
        );
        assert!(e.contains("default_ko_share = 1"), "{e}");
        // The default sets' share cannot silently do nothing beside the user's own sets.
        std::fs::write(
            &p,
            "[data]\ndefault_ko_share = 0.35\n[[data.calibration]]\ntag = \"en\"\nfiles = [\"a.txt\"]\n",
        )
        .unwrap();
        let e = format!("{:#}", ConvertConfig::load(Some(&p), &[]).unwrap_err());
        assert!(
            e.contains("c.toml") && e.contains("fetched default text sets only"),
            "{e}"
        );
        let c = ConvertConfig::load(None, &["data.default_ko_share=0.35".into()]).unwrap();
        assert_eq!(c.data.default_ko_share, 0.35);
    }

    #[test]
    fn overrides_reach_nested_fields() {
        let c = ConvertConfig::load(
            None,
            &[
                "stage1.train.experts=16".into(),
                "stage2.budget.fraction=0.6".into(),
                "model=/x/y".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.stage1.train.experts, 16);
        assert_eq!(c.stage2.budget.fraction, Some(0.6));
        assert_eq!(c.model, "/x/y");
    }
}
