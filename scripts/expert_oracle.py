#!/usr/bin/env python3
"""How much of a dense FFN's output can k of N experts keep, with a perfect router?

An analysis run by hand (nothing in the build calls it); it explains where stage 1's quality
frontier lies. For each chosen layer of SmolLM2 it cuts the FFN's intermediate neurons into N
equal contiguous experts and lets an *oracle* router pick, per token, the k experts whose true
output has the largest norm (combine weight 1, no training). It prints the relative error
`||y_hat - y|| / ||y||` against the dense FFN output, for several N and active fractions k/N.
N = intermediate size is one neuron per expert (contextual sparsity at neuron level).

A second table keeps the routed expert size at 1/D of the FFN (`--size-div D`, default 8) and the
active fraction at `--fraction`, and moves neurons from routed experts into a shared, always-on
set: the S neurons most often among a token's top 25% contributions (`|a_j| * ||down_j||`),
counted on other calibration tokens than those scored. S = all active neurons is static pruning (no routing at all).

With `--run DIR` (a stage-1 folder: `layerNNN.moe.safetensors`, e.g. from `cargo xtask distill`)
it also scores the *trained* blocks of those layers at top-`--k`: with their own router, with the
oracle router over the trained experts, and (N <= 8) with the best subset of k experts per token.
The router then has little left to win when its error is close to the oracle's.

Tokens come from calibration text (Emma, by default), never from the held-out sets; for the
trained blocks they are therefore in-sample (the stage-1 runs trained on this novel too).

Setup: the Python environment of scripts/make_fixtures.py. Run (repository root)::

    /root/.cache/ladimo/pyenv/bin/python scripts/expert_oracle.py --layers 5,15,25 \
        [--run ~/.cache/ladimo/runs/NAME --k 6]
"""

import argparse
import itertools
from pathlib import Path

import torch

CACHE = Path.home() / ".cache" / "ladimo"


def load(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers

    transformers.logging.set_verbosity_error()
    kw = dict(gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, torch_dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    return model.eval(), tok


def capture(model, ids, layers, seq_len):
    """FFN inputs `[tokens, hidden]` of `layers`, windows of `seq_len` tokens."""
    xs = {l: [] for l in layers}
    hooks = [
        model.model.layers[l].mlp.register_forward_pre_hook(lambda m, a, l=l: xs[l].append(a[0].reshape(-1, a[0].shape[-1])))
        for l in layers
    ]
    with torch.no_grad():
        for s in range(0, len(ids), seq_len):
            model(torch.tensor([ids[s : s + seq_len]]))
    for h in hooks:
        h.remove()
    return {l: torch.cat(v) for l, v in xs.items()}


def rel(y_hat, y):
    return float((y_hat - y).norm() / y.norm())


def oracle_error(contrib, y, k):
    """contrib: `[tokens, N, hidden]` per-expert outputs; keep the k largest norms per token."""
    idx = contrib.norm(dim=2).topk(k, dim=1).indices
    mask = torch.zeros(contrib.shape[:2]).scatter_(1, idx, 1.0)
    return rel((contrib * mask[:, :, None]).sum(1), y)


def swiglu(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=CACHE / "models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--text", type=Path, default=CACHE / "data/en/emma.txt")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", default="5,15,25")
    ap.add_argument("--experts", default="8,16,32,64,128,1536")
    ap.add_argument("--fractions", default="0.625,0.75,0.875")
    ap.add_argument("--fraction", type=float, default=0.75, help="active fraction of the shared-neuron table")
    ap.add_argument("--size-div", type=int, default=8, help="routed experts of 1/D of the FFN in the shared-neuron table")
    ap.add_argument("--run", type=Path, help="stage-1 folder whose trained blocks to score too")
    ap.add_argument("--k", type=int, default=6, help="top-k for the trained blocks of --run")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    torch.manual_seed(0)

    model, tok = load(a.gguf)
    # Skip the opening (title pages); take --tokens tokens.
    ids = tok(a.text.read_text(encoding="utf-8")[20_000:], add_special_tokens=False)["input_ids"]
    layers = [int(v) for v in a.layers.split(",")]
    # Scored tokens first; the next --tokens tokens only count how often neurons matter.
    xs = capture(model, ids[: a.tokens], layers, a.seq_len)
    xs_freq = capture(model, ids[a.tokens : 2 * a.tokens], layers, a.seq_len)
    experts = [int(v) for v in a.experts.split(",")]
    fractions = [float(v) for v in a.fractions.split(",")]

    print(f"{a.tokens} tokens of {a.text.name}; relative error of the oracle top-k of N contiguous experts\n")
    print("| layer | active | " + " | ".join(f"N={n}" for n in experts) + " |")
    print("|---|---|" + "---|" * len(experts))
    for l in layers:
        mlp = model.model.layers[l].mlp
        x = xs[l]
        with torch.no_grad():
            act = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)  # [T, F]
            down = mlp.down_proj.weight  # [H, F]
            y = act @ down.T
            f = act.shape[1]
            for frac in fractions:
                cells = []
                for n in experts:
                    s = f // n
                    contrib = torch.einsum("tes,hes->teh", act.view(-1, n, s), down.view(-1, n, s))
                    cells.append(f"{oracle_error(contrib, y, round(n * frac)):.3f}")
                print(f"| {l} | {frac:.3f} | " + " | ".join(cells) + " |")

    print(f"\nShared neurons + routed experts of 1/{a.size_div} of the FFN, {a.fraction:.3f} active, oracle router\n")
    print("| layer | shared S | routed | relative error |")
    print("|---|---|---|---|")
    for l in layers:
        mlp = model.model.layers[l].mlp
        with torch.no_grad():
            down = mlp.down_proj.weight
            f = down.shape[1]
            xf = xs_freq[l]
            contrib = (torch.nn.functional.silu(mlp.gate_proj(xf)) * mlp.up_proj(xf)).abs() * down.norm(dim=0)
            top = contrib.topk(f // 4, dim=1).indices
            order = torch.argsort(torch.bincount(top.flatten(), minlength=f), descending=True, stable=True)
            x = xs[l]
            act = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
            y = act @ down.T
            size, active = f // a.size_div, round(f * a.fraction)
            for shared in range(0, active + 1, size):
                fixed = order[:shared]
                y_hat = act[:, fixed] @ down[:, fixed].T
                rest = torch.sort(order[shared:]).values
                n, k = len(rest) // size, (active - shared) // size
                routed = "none (static pruning)" if k == 0 else f"top-{k} of {n}"
                if k > 0:
                    c = torch.einsum("tes,hes->teh", act[:, rest[: n * size]].view(-1, n, size), down[:, rest[: n * size]].view(-1, n, size))
                    idx = c.norm(dim=2).topk(k, dim=1).indices
                    mask = torch.zeros(c.shape[:2]).scatter_(1, idx, 1.0)
                    y_hat = y_hat + (c * mask[:, :, None]).sum(1)
                print(f"| {l} | {shared} | {routed} | {rel(y_hat, y):.3f} |")

    if a.run:
        from safetensors.torch import load_file

        print(f"\nTrained blocks of {a.run}, top-{a.k}: relative error against the dense FFN\n")
        print("| layer | own router | oracle router | best subset |")
        print("|---|---|---|---|")
        for l in layers:
            w = load_file(a.run / f"layer{l:03}.moe.safetensors")
            n = sum(1 for k in w if k.startswith("experts.") and k.endswith("down_proj.weight"))
            x = xs[l]
            with torch.no_grad():
                mlp = model.model.layers[l].mlp
                y = mlp(x)
                contrib = torch.stack(
                    [swiglu(x, *(w[f"experts.{e}.{p}_proj.weight"] for p in ("gate", "up", "down"))) for e in range(n)], 1
                )
                shared = swiglu(x, *(w[f"shared.{p}_proj.weight"] for p in ("gate", "up", "down"))) if "shared.gate_proj.weight" in w else 0
                logits = x @ w["router.weight"].T + w.get("router.bias", 0)
                idx = logits.topk(a.k, dim=1).indices
                mask = torch.zeros(x.shape[0], n).scatter_(1, idx, 1.0)
                own = rel(shared + (contrib * mask[:, :, None]).sum(1), y)
                idx = contrib.norm(dim=2).topk(a.k, dim=1).indices
                mask = torch.zeros(x.shape[0], n).scatter_(1, idx, 1.0)
                orc = rel(shared + (contrib * mask[:, :, None]).sum(1), y)
                best = "-"
                if n <= 8:
                    errs = None
                    for subset in itertools.combinations(range(n), a.k):
                        e = (shared + contrib[:, list(subset)].sum(1) - y).norm(dim=1)
                        errs = e if errs is None else torch.minimum(errs, e)
                    best = f"{float(errs.norm() / y.norm()):.3f}"
            print(f"| {l} | {own:.3f} | {orc:.3f} | {best} |")


if __name__ == "__main__":
    main()
