//! Tokenizers: Hugging Face `tokenizer.json`, or one rebuilt from GGUF `tokenizer.ggml.*` metadata.

use std::path::Path;
use std::str::FromStr;

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, GgufValue};

/// A text <-> token-id mapping (a thin wrapper over the `tokenizers` crate).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The chat template, when the checkpoint carries one (only ChatML is rendered).
    pub chat_template: Option<String>,
}

impl Tokenizer {
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let inner = build(&text, &path, "cannot read tokenizer")?;
        let cfg_path = dir.join("tokenizer_config.json");
        let chat_template = std::fs::read_to_string(&cfg_path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v.get("chat_template").and_then(Value::as_str).map(String::from));
        Ok(Self { inner, chat_template })
    }

    /// Rebuild the tokenizer that llama.cpp uses for this GGUF (byte-level BPE, `gpt2` model).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let json = gguf_tokenizer_json(file)?;
        let inner = build(
            &json.to_string(),
            &file.path,
            "cannot build tokenizer from GGUF metadata",
        )?;
        let chat_template = file
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
            .map(String::from);
        Ok(Self { inner, chat_template })
    }

    /// Token ids of `text`, with no BOS or other added tokens; special-token strings are recognised.
    /// The tokenizer as Hugging Face `tokenizer.json` text (for checkpoints ladimo writes).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| Error::Format {
            path: "tokenizer.json".into(),
            msg: format!("cannot serialise the tokenizer: {e}"),
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Format {
            path: "<tokenizer>".into(),
            msg: e.to_string(),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Format {
            path: "<tokenizer>".into(),
            msg: e.to_string(),
        })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Render a single user turn with the checkpoint's chat template (ChatML only), after the
    /// system turn the template writes when a conversation has none ([`default_system_turn`]).
    pub fn apply_chat_template(&self, user: &str) -> Option<String> {
        let t = self.chat_template.as_deref()?;
        if !t.contains("<|im_start|>") {
            return None;
        }
        let system = default_system_turn(t).unwrap_or_default();
        Some(format!(
            "{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ))
    }
}

/// A `tokenizers` tokenizer from `tokenizer.json` text. The text is parsed as JSON first (a
/// syntax error, or nesting deeper than serde_json's limit, is refused here with its line), and
/// the `tokenizers` crate, which panics on some malformed sections (an `expect` in its decoder
/// and normalizer readers), runs under `catch_unwind`: its panic becomes an error, with the panic
/// message kept out of standard error.
fn build(text: &str, path: &Path, what: &str) -> Result<tokenizers::Tokenizer> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| Error::format(path, format!("{what}: not valid JSON: {e}")))?;
    let result = quiet_catch_unwind(|| tokenizers::Tokenizer::from_str(text));
    match result {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(Error::format(path, format!("{what}: {e}"))),
        Err(panic) => Err(Error::format(
            path,
            format!("{what}: the tokenizers crate failed on it ({panic})"),
        )),
    }
}

/// Run `f`, turning a panic into `Err(its message)`, with the process's panic hook silenced
/// meanwhile (one caller at a time; a panic on another thread in that window goes unprinted).
fn quiet_catch_unwind<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = HOOK.lock().unwrap_or_else(|p| p.into_inner());
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    result.map_err(|payload| match payload.downcast_ref::<&str>() {
        Some(s) => s.to_string(),
        None => payload.downcast_ref::<String>().cloned().unwrap_or_default(),
    })
}

/// The system turn a ChatML template writes when a conversation starts without one: the
/// template's first string literal that opens a system turn (`'<|im_start|>system...'`), with
/// `\n` escapes read as line breaks. None when the template writes no such turn.
fn default_system_turn(template: &str) -> Option<String> {
    let start = template.find("'<|im_start|>system")? + 1;
    let len = template[start..].find('\'')?;
    Some(template[start..start + len].replace("\\n", "\n"))
}

/// The `tokenizer.json` equivalent of a GGUF's byte-level BPE tokenizer.
fn gguf_tokenizer_json(file: &GgufFile) -> Result<Value> {
    let path = &file.path;
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(Error::unsupported(
            path,
            format!(
                "GGUF tokenizer model `{model}` (supported: gpt2 byte-level BPE); use a Hugging Face directory with tokenizer.json"
            ),
        ));
    }
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        // llama.cpp's SMOLLM pre-tokenizer: every digit on its own, then the GPT-2 regex.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "gpt2" | "default" => byte_level,
        other => {
            return Err(Error::unsupported(
                path,
                format!("GGUF pre-tokenizer `{other}` (supported: smollm, gpt2, default)"),
            ));
        }
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        file.get(key)
            .and_then(GgufValue::as_array)
            .ok_or_else(|| Error::format(path, format!("missing metadata `{key}`")))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .ok_or_else(|| Error::format(path, format!("`{key}` holds a non-string")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(GgufValue::as_i64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| Error::format(path, "`tokenizer.ggml.token_type` is not an array of integers"))?,
    };
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(Error::format(
            path,
            format!(
                "`tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                types.len(),
                tokens.len()
            ),
        ));
    }
    let vocab: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    // Control (3) and user-defined (4) tokens are matched whole, before the model sees the text.
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t == 3 || t == 4)
        .map(|(i, &t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": t == 3})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    }))
}

#[cfg(test)]
mod chat_tests {
    use super::default_system_turn;

    #[test]
    fn the_system_turn_comes_from_the_template() {
        // SmolLM2-Instruct's template, as its GGUF carries it.
        let t = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
                 {{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\
                 <|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + \
                 '<|im_end|>' + '\n'}}{% endfor %}";
        assert_eq!(
            default_system_turn(t).as_deref(),
            Some(
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            )
        );
        // Escaped line breaks read as line breaks; a template without a system turn has none.
        assert_eq!(
            default_system_turn(r"{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}").as_deref(),
            Some("<|im_start|>system\nBe brief.<|im_end|>\n")
        );
        assert_eq!(default_system_turn("{{'<|im_start|>' + message['role'] }}"), None);
    }
}
