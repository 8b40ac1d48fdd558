#!/usr/bin/env python3
"""Check that a Mixtral export of ladimo loads in Hugging Face transformers and computes what
ladimo computes. Run by hand (needs torch + transformers; ~/.cache/ladimo/pyenv has them):

    cargo build --release -p ladimo-cli
    ~/.cache/ladimo/pyenv/bin/python scripts/check_mixtral_export.py MODEL_DIR [--prompt TEXT]

It runs `target/release/ladimo logits` on the folder, loads the folder with
AutoModelForCausalLM (it must say MixtralForCausalLM), runs the same token ids, and prints the
max |diff| of the logits over every position (target <= 1e-3) and the greedy next tokens.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", default="It is a truth universally acknowledged, that a single man in possession "
                    "of a good fortune, must be in want of a wife. 대한민국은 민주공화국이다.")
    ap.add_argument("--ladimo", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "ladimo"))
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    print("architectures:", cfg.get("architectures"), "mixtral_exact:", cfg.get("ladimo", {}).get("mixtral_exact"))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "logits.safetensors")
        exe = os.environ.get("LADIMO_BIN", a.ladimo)
        subprocess.run([exe, "logits", a.model, "--prompt", a.prompt, "--out", out], check=True)
        ours = load_file(out)
    ids = ours["ids"].long().unsqueeze(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    model.eval()
    print("transformers class:", type(model).__name__)
    with torch.no_grad():
        theirs = model(ids).logits[0].float()
    diff = (theirs - ours["logits"]).abs().max().item()
    last = (theirs[-1] - ours["logits"][-1]).abs().max().item()
    agree = (theirs.argmax(-1) == ours["logits"].argmax(-1)).float().mean().item()
    print(f"tokens {ids.shape[1]}: max |diff| over all positions {diff:.3e}, last position {last:.3e}, "
          f"argmax agreement {agree:.3f}")
    ok = diff <= 1e-3
    print("PASS" if ok else "FAIL (target max |diff| <= 1e-3)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
