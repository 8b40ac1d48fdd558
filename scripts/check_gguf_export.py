#!/usr/bin/env python3
"""Check that a GGUF export of a ladimo model (`ladimo export --format gguf`) runs in llama.cpp
(llama-cpp-python from PyPI) and computes what ladimo computes. Run by CI on the tiny model
(tests/export.rs) and by hand on SmolLM2:

    cargo build --release -p ladimo-cli
    ~/.cache/ladimo/pyenv/bin/python scripts/check_gguf_export.py SOURCE EXPORT/model.gguf \
        --text ~/.cache/ladimo/data/en/persuasion.txt [--tokens 4096] [--seq-len 512]
        [--ppl-tolerance 0.01] [--dense-gguf DENSE.gguf --decode-tokens 64]

SOURCE is what ladimo runs (the converted folder; `--policy FILE` if the export took one). Both
sides score the same token ids (SOURCE's tokenizer; llama.cpp's own is not used): perplexity over
non-overlapping windows of SEQ_LEN, each on its own, no BOS (as `ladimo perplexity`), and the
max |logit diff| over the first window's first 64 positions. With --dense-gguf it also times
greedy decoding (one token at a time after a 16-token prompt) of the export and of the dense
GGUF in llama.cpp, median of 3 runs. The last line is a JSON object with the figures; exit 0
when the perplexities are within PPL_TOLERANCE (relative).
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np
from llama_cpp import Llama
from tokenizers import Tokenizer


def ladimo_bin():
    here = os.path.dirname(os.path.abspath(__file__))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(here, "..", "target"))
    return os.environ.get("LADIMO_BIN", os.path.join(target, "release", "ladimo"))


def load(path, n_ctx, threads):
    return Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                 n_threads=threads, n_threads_batch=threads, verbose=False)


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def llama_cpp_ppl(llm, ids, seq_len):
    """Perplexity over non-overlapping windows, each scored on its own; and the first window's logits."""
    nll, count, first = 0.0, 0, None
    for start in range(0, len(ids) - 1, seq_len):
        w = ids[start:start + seq_len]
        if len(w) < 2:
            break
        llm.reset()
        llm.eval(w)
        scores = np.array(llm.scores[:len(w)], dtype=np.float32)
        if first is None:
            first = scores
        lp = log_softmax(scores[:-1])
        nll -= lp[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return math.exp(nll / count), count, first


def decode_speed(path, prompt, n, threads):
    """Greedy decoding tokens/s in llama.cpp (median of 3)."""
    llm = Llama(model_path=path, n_ctx=len(prompt) + n + 8, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    rates = []
    for _ in range(3):
        llm.reset()
        llm.eval(prompt)
        t = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("gguf")
    ap.add_argument("--text", required=True)
    ap.add_argument("--policy")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: SOURCE/tokenizer.json)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ppl-tolerance", type=float, default=0.01)
    ap.add_argument("--dense-gguf")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    exe = ladimo_bin()
    pol = ["--policy", a.policy] if a.policy else []

    text = open(a.text, encoding="utf-8").read()
    tok = Tokenizer.from_file(a.tokenizer or os.path.join(a.source, "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids[:a.tokens]

    out = subprocess.run([exe, "perplexity", a.source, "--text", a.text, "--seq-len", str(a.seq_len),
                          "--max-tokens", str(a.tokens)] + pol, check=True, capture_output=True, text=True).stdout
    ours_ppl = float(re.search(r"perplexity: ([0-9.]+)", out).group(1))

    llm = load(a.gguf, a.seq_len, a.threads)
    theirs_ppl, predicted, first = llama_cpp_ppl(llm, ids, a.seq_len)
    del llm

    # Logits of the first 64 positions against `ladimo logits` on the same text.
    n = min(64, len(ids))
    import tempfile

    from safetensors.numpy import load_file
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "l.safetensors")
        subprocess.run([exe, "logits", a.source, "--prompt", text[:4000], "--max-tokens", str(n), "--out", f] + pol,
                       check=True, stdout=subprocess.DEVNULL)
        ref = load_file(f)
    same_ids = ref["ids"].tolist() == ids[:n]
    diff = float(np.abs(first[:n] - ref["logits"]).max()) if same_ids else float("nan")
    agree = float((first[:n].argmax(-1) == ref["logits"].argmax(-1)).mean()) if same_ids else float("nan")

    rel = abs(theirs_ppl - ours_ppl) / ours_ppl
    print(f"{a.gguf}: llama.cpp PPL {theirs_ppl:.4f} vs ladimo {ours_ppl:.4f} ({predicted} predicted tokens, "
          f"relative diff {rel:.4%})")
    print(f"first {n} positions: max |logit diff| {diff:.3e}, argmax agreement {agree:.3f}")
    res = {"ppl_llama_cpp": theirs_ppl, "ppl_ladimo": ours_ppl, "predicted": predicted, "rel_diff": rel,
           "max_abs_diff": diff, "argmax_agreement": agree}
    if a.dense_gguf:
        prompt = ids[:16]
        moe = decode_speed(a.gguf, prompt, a.decode_tokens, a.threads)
        dense = decode_speed(a.dense_gguf, prompt, a.decode_tokens, a.threads)
        print(f"llama.cpp greedy decode ({a.decode_tokens} tokens, {a.threads} threads, median of 3): "
              f"export {moe:.1f} tok/s, dense {dense:.1f} tok/s, ratio {moe / dense:.2f}")
        res.update({"decode_tok_s": moe, "dense_decode_tok_s": dense})
    ok = rel <= a.ppl_tolerance
    res["ok"] = ok
    print(json.dumps(res))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
