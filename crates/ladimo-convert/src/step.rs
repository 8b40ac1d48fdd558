//! A resumable step of the work folder: its folder, the key of what it was made from, and its
//! timing, written once here for every step of the pipeline.
//!
//! A step's folder holds `key.txt` (written when the step starts) and `done.json` (its key and
//! seconds, written when it finishes). A rerun whose key matches `done.json` reuses the results;
//! one whose key matches only `key.txt` resumes in the folder (stage 1 keeps finished layers);
//! any other key empties the folder first.
//!
//! Keys are hashes of the parent step's key, the token ids and the step's settings struct as
//! serialized, less the fields listed in [`NOT_IN_KEY`] (the one place that says which settings
//! do not change what a step makes). A new settings field is therefore in the key unless it is
//! listed there.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ladimo_io::hash::content_hash;
use serde::{Deserialize, Serialize};

use crate::evaluate::write_json;
use crate::report::StageTime;

/// Per step, the fields of its settings struct that do not change what it makes.
pub const NOT_IN_KEY: &[(&str, &[&str])] = &[
    // `keep_capture` only keeps a temporary; the polish is a step of its own.
    ("stage1", &["keep_capture", "finetune"]),
    ("polish", &[]),
    // The solve is redone on every run (it takes milliseconds); the layer sensitivity and the
    // polish under the chosen policies are steps of their own, so that changing their settings
    // keeps the profile.
    (
        "profile",
        &[
            "budget",
            "cost",
            "fixed_policy",
            "polish",
            "sensitivity_k",
            "sensitivity_tokens",
            "sensitivity_context",
        ],
    ),
    ("sensitivity", &["budget", "cost", "fixed_policy", "polish"]),
    ("stage2-polish", &[]),
    ("eval", &[]),
];

/// The layout of the files the steps write, part of every key: a work folder written by a ladimo
/// whose files were laid out otherwise is then made again instead of misread (a stage-1 folder
/// from before the one MoE block format failed with "not an MoE block file"). Raise it when a
/// step's files change.
pub const FORMAT: &str = "ladimo work format 2";

/// The key of step `step` (a name in [`NOT_IN_KEY`]): a hash of [`FORMAT`], `parts` and
/// `settings` serialized, less the fields [`NOT_IN_KEY`] lists for the step.
pub fn step_key(step: &str, parts: &[&[u8]], settings: &impl Serialize) -> Result<String> {
    let value = serde_json::to_value(settings).context("serializing a step's settings")?;
    key_of_value(step, parts, value)
}

/// [`step_key`] on settings already serialized (tests change fields here generically).
pub fn key_of_value(step: &str, parts: &[&[u8]], mut value: serde_json::Value) -> Result<String> {
    let Some((_, left_out)) = NOT_IN_KEY.iter().find(|(s, _)| *s == step) else {
        bail!("no step `{step}` in NOT_IN_KEY");
    };
    let Some(fields) = value.as_object_mut() else {
        bail!("step `{step}`: its settings are not a struct");
    };
    for f in *left_out {
        if fields.remove(*f).is_none() {
            bail!("NOT_IN_KEY names `{step}.{f}`, which its settings do not have");
        }
    }
    let settings = serde_json::to_vec(&value)?;
    Ok(content_hash(
        std::iter::once(FORMAT.as_bytes())
            .chain(parts.iter().copied())
            .chain([settings.as_slice()]),
    ))
}

/// Token ids as bytes, for a key.
pub fn ids_bytes(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// A step's record in its folder: what it was made from and how long it took.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StepRecord {
    key: String,
    seconds: f64,
}

/// One step of the work folder.
pub struct Step {
    pub dir: PathBuf,
    pub key: String,
    /// The name of the step in the report's times.
    label: &'static str,
}

impl Step {
    pub fn new(dir: PathBuf, label: &'static str, key: String) -> Self {
        Self { dir, key, label }
    }

    /// Reuse the step's results or make them. `reuse` reads them from the folder when a finished
    /// run had this key (`None`: unusable, make them again); `make` writes them into the folder.
    /// `make` may time its parts itself (pushing to the times it is given); otherwise the step is
    /// one entry under its label.
    pub fn run<T>(
        &self,
        times: &mut Vec<StageTime>,
        reuse: impl FnOnce(&Path) -> Result<Option<T>>,
        make: impl FnOnce(&Path, &mut Vec<StageTime>) -> Result<T>,
    ) -> Result<T> {
        if let Some(r) = self.record()
            && let Some(v) = reuse(&self.dir)?
        {
            tracing::info!("{}: reusing {} (finished earlier)", self.label, self.dir.display());
            times.push(StageTime::earlier(self.label, r.seconds));
            return Ok(v);
        }
        self.open()?;
        let (t, before) = (Instant::now(), times.len());
        let v = make(&self.dir, times)?;
        let seconds = t.elapsed().as_secs_f64();
        if times.len() == before {
            times.push(StageTime::now(self.label, seconds));
        }
        write_json(
            &self.dir.join("done.json"),
            &StepRecord {
                key: self.key.clone(),
                seconds,
            },
        )?;
        Ok(v)
    }

    fn record(&self) -> Option<StepRecord> {
        let r: StepRecord = serde_json::from_slice(&std::fs::read(self.dir.join("done.json")).ok()?).ok()?;
        (r.key == self.key).then_some(r)
    }

    /// Make the folder hold results for this key: keep it when its `key.txt` says this key, else
    /// empty it (the work folder is ours; nothing of the user's lives there).
    fn open(&self) -> Result<()> {
        let (dir, key_file) = (&self.dir, self.dir.join("key.txt"));
        let same = std::fs::read_to_string(&key_file).is_ok_and(|k| k.trim() == self.key);
        if dir.exists() && !same {
            tracing::warn!("{}: made from other inputs; starting this step again", dir.display());
            std::fs::remove_dir_all(dir).with_context(|| format!("{}: cannot clear", dir.display()))?;
        }
        ladimo_io::atomic::write_atomic(&key_file, self.key.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConvertConfig;

    /// Every field of `settings` not listed for `step` in NOT_IN_KEY changes the key; a listed one
    /// does not.
    fn check_every_field(step: &str, settings: &impl Serialize) {
        let value = serde_json::to_value(settings).unwrap();
        let base = key_of_value(step, &[b"parent"], value.clone()).unwrap();
        let left_out = NOT_IN_KEY.iter().find(|(s, _)| *s == step).unwrap().1;
        for field in value.as_object().unwrap().keys() {
            let mut changed = value.clone();
            changed[field] = serde_json::json!("changed");
            let key = key_of_value(step, &[b"parent"], changed).unwrap();
            if left_out.contains(&field.as_str()) {
                assert_eq!(key, base, "{step}.{field} is listed as not in the key");
            } else {
                assert_ne!(key, base, "{step}.{field} does not change the key");
            }
        }
    }

    #[test]
    fn every_stage2_field_changes_the_stage2_keys() {
        let s2 = ConvertConfig::default().stage2;
        check_every_field("profile", &s2);
        check_every_field("sensitivity", &s2);
        // The stage-2 result the evaluation is keyed on: every field but the solver's own (which
        // reach the evaluation through the policy file) and the polish's (through its own step's
        // key, the evaluation's parent when it runs) changes the sensitivity key.
        let solver_only = NOT_IN_KEY.iter().find(|(s, _)| *s == "sensitivity").unwrap().1;
        assert!(
            solver_only
                .iter()
                .all(|f| ["budget", "cost", "fixed_policy", "polish"].contains(f))
        );
    }

    #[test]
    fn every_other_step_keys_its_settings() {
        let c = ConvertConfig::default();
        check_every_field("stage1", &c.stage1);
        check_every_field("polish", &c.stage1.finetune);
        check_every_field("stage2-polish", &c.stage2.polish);
        check_every_field("eval", &c.eval);
    }

    #[test]
    fn a_listed_field_that_does_not_exist_is_an_error() {
        let e = key_of_value("stage1", &[], serde_json::json!({ "tokens": 1 })).unwrap_err();
        assert!(e.to_string().contains("stage1.keep_capture"), "{e}");
        assert!(key_of_value("nonsense", &[], serde_json::json!({})).is_err());
    }

    #[test]
    fn the_parent_key_changes_the_key() {
        let s = ConvertConfig::default().eval;
        assert_ne!(
            step_key("eval", &[b"a"], &s).unwrap(),
            step_key("eval", &[b"b"], &s).unwrap()
        );
    }
}
