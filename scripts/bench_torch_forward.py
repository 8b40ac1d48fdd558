#!/usr/bin/env python3
"""PyTorch CPU baseline for SmolLM2-135M (the number ladimo's forward pass is compared with).

Loads the SmolLM2 GGUF through transformers' GGUF loader (dequantised to float32, CPU, eager
attention) and measures:

* prefill: one forward pass over a 512-token prompt of random ids (seed 0), no KV cache;
  1 warm-up + 3 timed repeats, median -> prefill_tok_s = 512 / median_seconds.
* decode: a 16-token prompt (random ids, seed 1) is prefilled (not timed), then 64 greedy
  single-token steps with the KV cache (DynamicCache) are timed; median of 3 runs (after 1
  warm-up run) -> decode_tok_s = 64 / median_seconds.

Prints ONE JSON line: {"prefill_tok_s": x, "decode_tok_s": y, "torch": version, "threads": n}
(progress goes to stderr).

Setup: see scripts/make_fixtures.py (same venv). Run:

    /root/.cache/ladimo/pyenv/bin/python scripts/bench_torch_forward.py [--threads 2] [--gguf PATH]
"""

import argparse
import inspect
import json
import os
import statistics
import sys
import time

DEFAULT_GGUF = "/root/.cache/ladimo/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-prompt", type=int, default=16)
    ap.add_argument("--decode-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(args.threads)
    gdir, gname = os.path.split(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(
        gdir, gguf_file=gname, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    vocab = model.config.vocab_size

    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, vocab, (1, args.prefill_len), generator=g)
    g = torch.Generator().manual_seed(1)
    decode_prompt = torch.randint(0, vocab, (1, args.decode_prompt), generator=g)

    def prefill_once():
        t0 = time.perf_counter()
        model(input_ids=prefill_ids, use_cache=False)
        return time.perf_counter() - t0

    # newer transformers renamed forward(past_key_values=...) to forward(cache=...)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def decode_once():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=decode_prompt, use_cache=True, **{cache_kw: cache})
        nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(args.decode_new):
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: cache})
            nxt = out.logits[:, -1:].argmax(-1)
        assert cache.get_seq_length() == args.decode_prompt + args.decode_new
        return time.perf_counter() - t0

    with torch.inference_mode():
        prefill_once()  # warm-up
        pre = [prefill_once() for _ in range(args.repeats)]
        print(f"prefill seconds: {pre}", file=sys.stderr)
        decode_once()  # warm-up
        dec = [decode_once() for _ in range(args.repeats)]
        print(f"decode seconds ({args.decode_new} steps): {dec}", file=sys.stderr)

    print(
        json.dumps(
            {
                "prefill_tok_s": round(args.prefill_len / statistics.median(pre), 2),
                "decode_tok_s": round(args.decode_new / statistics.median(dec), 2),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
