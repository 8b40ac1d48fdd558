#!/usr/bin/env python3
"""Check that a Hugging Face export of a ladimo model (`ladimo export --format mixtral |
granitemoe | hf-remote`) loads in transformers and computes what ladimo computes on the model it
came from. Run by CI on the tiny model (tests/export.rs) and by hand on SmolLM2:

    cargo build --release -p ladimo-cli
    ~/.cache/ladimo/pyenv/bin/python scripts/check_hf_export.py SOURCE EXPORT [--policy FILE]
        [--positions 64] [--new-tokens 16] [--tolerance 1e-3 | --approximate]

SOURCE is what ladimo runs (the converted folder, with its policy file if the export took one),
EXPORT the exported folder. The script runs `ladimo logits` and `ladimo generate` (greedy) on
SOURCE, loads EXPORT with AutoModelForCausalLM (trust_remote_code for hf-remote), and compares:
max |logit diff| over the first POSITIONS positions and argmax agreement, then the greedy
continuation of the prompt. The last line is a JSON object with the figures. Exit 0 when the
logits are within TOLERANCE and the continuations equal; with --approximate it only reports.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered as the rightful property of some one or other "
    "of their daughters. 대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 "
    "국민으로부터 나온다."
)
CONTINUE = "The capital of France is"


def ladimo_bin():
    here = os.path.dirname(os.path.abspath(__file__))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(here, "..", "target"))
    return os.environ.get("LADIMO_BIN", os.path.join(target, "release", "ladimo"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("export")
    ap.add_argument("--policy")
    ap.add_argument("--positions", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--approximate", action="store_true", help="report only: the export is an approximation")
    a = ap.parse_args()
    exe = ladimo_bin()
    pol = ["--policy", a.policy] if a.policy else []
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "logits.safetensors")
        subprocess.run([exe, "logits", a.source, "--prompt", PROMPT, "--out", out,
                        "--max-tokens", str(a.positions)] + pol, check=True,
                       stdout=subprocess.DEVNULL)
        ours = load_file(out)
    n = min(a.positions, ours["ids"].shape[0])
    ids = ours["ids"][:n].long().unsqueeze(0)
    ref = ours["logits"][:n]

    cfg = json.load(open(os.path.join(a.export, "config.json")))
    remote = "auto_map" in cfg
    model = AutoModelForCausalLM.from_pretrained(a.export, dtype=torch.float32, trust_remote_code=remote)
    model.eval()
    with torch.no_grad():
        theirs = model(ids).logits[0].float()
    diff = (theirs - ref).abs().max().item()
    agree = (theirs.argmax(-1) == ref.argmax(-1)).float().mean().item()

    # Greedy continuation: ladimo's text after the prompt against transformers'.
    gen = subprocess.run([exe, "generate", a.source, "--prompt", CONTINUE, "--max-new-tokens",
                          str(a.new_tokens), "--temperature", "0"] + pol,
                         check=True, capture_output=True, text=True).stdout
    ours_text = gen[len(CONTINUE):].rstrip("\n")
    tok = AutoTokenizer.from_pretrained(a.export, trust_remote_code=remote)
    prompt_ids = torch.tensor([tok(CONTINUE)["input_ids"]])
    with torch.no_grad():
        full = model.generate(prompt_ids, max_new_tokens=a.new_tokens, do_sample=False,
                              attention_mask=torch.ones_like(prompt_ids))
    new = full[0, prompt_ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    theirs_text = tok.decode([t for t in new if t not in eos])
    # A continuation cut inside a UTF-8 character ends in U+FFFD on either side.
    ours_text, theirs_text = ours_text.rstrip("\ufffd"), theirs_text.rstrip("\ufffd")
    same = ours_text == theirs_text

    print(f"{type(model).__name__} from {a.export}")
    print(f"positions {n}: max |logit diff| {diff:.3e}, argmax agreement {agree:.3f}")
    print(f"greedy ({a.new_tokens} tokens) ladimo:       {ours_text!r}")
    print(f"greedy ({a.new_tokens} tokens) transformers: {theirs_text!r}")
    ok = a.approximate or (diff <= a.tolerance and same)
    print(json.dumps({"class": type(model).__name__, "positions": n, "max_abs_diff": diff,
                      "argmax_agreement": agree, "greedy_equal": same, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
