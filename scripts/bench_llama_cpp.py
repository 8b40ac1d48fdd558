"""Dense decode tokens/s of llama.cpp (llama-cpp-python) on a GGUF, for `cargo xtask bench forward
--sparse`: a prompt of --prompt-len tokens, then --decode-tokens single-token steps (greedy, the
step the Rust side times), median of --repeats. Prints one JSON line."""

import argparse
import json
import os
import statistics
import time

import llama_cpp

p = argparse.ArgumentParser()
p.add_argument("--gguf", required=True)
p.add_argument("--prompt-len", type=int, default=256)
p.add_argument("--decode-tokens", type=int, default=32)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--threads", type=int, default=os.cpu_count())
a = p.parse_args()

ctx = a.prompt_len + a.decode_tokens + 16
llm = llama_cpp.Llama(
    model_path=a.gguf,
    n_ctx=ctx,
    # `scores` keeps one row per position of the last batch: a prompt longer than the batch
    # would leave its last position's logits out of reach.
    n_batch=max(512, ctx),
    n_threads=a.threads,
    n_threads_batch=a.threads,
    verbose=False,
)
vocab = llm.n_vocab()
prompt = [17 + (i * 7919) % (vocab - 17) for i in range(a.prompt_len)]


def run():
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    tok = prompt[-1]
    for _ in range(a.decode_tokens):
        logits = llm.scores[llm.n_tokens - 1]
        tok = int(logits.argmax())
        llm.eval([tok])
    t2 = time.perf_counter()
    return a.prompt_len / (t1 - t0), a.decode_tokens / (t2 - t1)


run()  # warm-up
res = [run() for _ in range(a.repeats)]
print(
    json.dumps(
        {
            "prefill_tok_s": statistics.median(r[0] for r in res),
            "decode_tok_s": statistics.median(r[1] for r in res),
            "threads": a.threads,
            "llama_cpp": llama_cpp.__version__,
        }
    )
)
