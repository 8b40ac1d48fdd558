"""ladimo's converted FFNs on transformers' own LLaMA / HyperCLOVA X models (`trust_remote_code`).

Attention, norms, embeddings and the head are transformers' classes; each layer named in
`config.ladimo_layers` gets its FFN replaced by what ladimo computes there:

- `moe`: router softmax over all experts; per token the experts its policy chooses (TopK, TopP,
  Confidence; most probable first, ties to the lower index); each chosen expert's output weighted
  by the combine rule (Unit: 1, Raw: its probability, Renormalized: its probability over the
  chosen ones' sum); plus the always-on shared experts. Any combine scale is already folded into
  the routed experts' down projections. With `sparsity` (TEAL inside the experts,
  crates/ladimo-moe/src/block.rs header): the router sees the unthresholded input; then
  `x_i = 0` where `|x_i| < x`, once, for every expert that runs (shared ones included), and inside
  each of them `h_j = 0` where `|h_j| < h`, before its down projection and combine weight.
- `sparse`: a dense SwiGLU FFN with activation sparsity (Static neuron set, CATS, TEAL).

Written by `ladimo export --format hf-remote`; the same rules as crates/ladimo-moe (block.rs,
policy.rs, sparsity.rs).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from .configuration_ladimo import LadimoConfig

try:
    from transformers import HyperCLOVAXForCausalLM

    from .configuration_ladimo import LadimoHyperClovaXConfig
except ImportError:  # a transformers without HyperCLOVA X
    HyperCLOVAXForCausalLM = None


class SwiGlu(nn.Module):
    def __init__(self, hidden, inter, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def activation(self, x):
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x):
        return self.down_proj(self.activation(x))


class SparseMlp(SwiGlu):
    """A dense FFN with activation sparsity (crates/ladimo-moe/src/sparsity.rs)."""

    def __init__(self, hidden, inter, sparsity, bias=False):
        super().__init__(hidden, inter, bias)
        self.sparsity = sparsity

    def forward(self, x):
        s = self.sparsity
        kind = s["type"]
        if kind == "Static":
            keep = torch.tensor(s["keep"], dtype=torch.long, device=x.device)
            g = F.linear(x, self.gate_proj.weight[keep])
            u = F.linear(x, self.up_proj.weight[keep])
            return F.linear(F.silu(g) * u, self.down_proj.weight[:, keep])
        if kind == "Cats":
            a = F.silu(self.gate_proj(x))
            h = (a * self.up_proj(x)).masked_fill(a.abs() < s["gate"], 0.0)
            return self.down_proj(h)
        if kind == "Teal":
            x = x.masked_fill(x.abs() < s["x"], 0.0)
            h = self.activation(x)
            return self.down_proj(h.masked_fill(h.abs() < s["h"], 0.0))
        raise ValueError(f"unknown sparsity {kind}")


class LadimoMoe(nn.Module):
    """Router + routed experts + optional shared experts (crates/ladimo-moe/src/block.rs)."""

    def __init__(self, hidden, spec, bias=False):
        super().__init__()
        sizes = spec["experts"]
        self.router = nn.Linear(hidden, len(sizes), bias=spec["router_bias"])
        self.experts = nn.ModuleList(SwiGlu(hidden, s, bias) for s in sizes)
        self.shared = SwiGlu(hidden, spec["shared"], bias) if spec["shared"] else None
        self.policy = spec["policy"]
        self.weights = spec["weights"]
        self.sparsity = spec.get("sparsity")

    def run(self, expert, x):
        """One expert on its tokens, with the in-expert TEAL `h` threshold when there is one."""
        if self.sparsity is None:
            return expert(x)
        h = expert.activation(x)
        return expert.down_proj(h.masked_fill(h.abs() < self.sparsity["h"], 0.0))

    def counts(self, sorted_probs):
        """How many experts each token runs, from its probabilities sorted high to low."""
        p = self.policy
        n = sorted_probs.shape[0]
        kind = p["type"]
        if kind == "TopK":
            return torch.full((n,), p["k"], device=sorted_probs.device)
        if kind == "TopP":
            # Keep experts while the mass before them is below p; the top-1 always runs.
            before = torch.cumsum(sorted_probs, dim=-1)[:, :-1]
            k = 1 + (before < p["p"]).sum(dim=-1)
            return k.clamp(p["min_k"], p["max_k"])
        if kind == "Confidence":
            low = torch.full((n,), p["k_low"], device=sorted_probs.device)
            high = torch.full((n,), p["k_high"], device=sorted_probs.device)
            return torch.where(sorted_probs[:, 0] >= p["tau"], low, high)
        raise ValueError(f"unknown policy {kind}")

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x).float(), dim=-1)
        e = probs.shape[-1]
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        k = self.counts(sorted_probs)
        in_top = torch.arange(e, device=x.device)[None, :] < k[:, None]
        chosen = torch.zeros_like(in_top).scatter(1, order, in_top)
        if self.weights in ("Unit", "UnitStraightThrough"):
            w = None
        elif self.weights == "Raw":
            w = probs
        elif self.weights == "Renormalized":
            w = probs * chosen
            w = w / w.sum(dim=-1, keepdim=True)
        else:
            raise ValueError(f"unknown combine weights {self.weights}")
        if self.sparsity is not None:
            if self.sparsity["type"] != "Teal":
                raise ValueError(f"only TEAL runs inside experts, not {self.sparsity['type']}")
            x = x.masked_fill(x.abs() < self.sparsity["x"], 0.0)
        out = self.run(self.shared, x) if self.shared is not None else torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            idx = chosen[:, i].nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            y = self.run(expert, x[idx])
            if w is not None:
                y = y * w[idx, i, None].to(y.dtype)
            out = out.index_add(0, idx, y)
        return out.reshape(shape)


def install_ladimo_layers(model, config):
    """Replace the FFN of every layer `config.ladimo_layers` names."""
    bias = bool(getattr(config, "mlp_bias", False))
    for spec in getattr(config, "ladimo_layers", None) or []:
        layer = model.layers[spec["layer"]]
        if spec["kind"] == "moe":
            layer.mlp = LadimoMoe(config.hidden_size, spec, bias)
        elif spec["kind"] == "sparse":
            layer.mlp = SparseMlp(config.hidden_size, config.intermediate_size, spec["sparsity"], bias)
        else:
            raise ValueError(f"layer {spec['layer']}: unknown kind {spec['kind']}")


class LadimoForCausalLM(LlamaForCausalLM):
    config_class = LadimoConfig

    def __init__(self, config):
        super().__init__(config)
        install_ladimo_layers(self.model, config)


if HyperCLOVAXForCausalLM is not None:

    class LadimoHyperClovaXForCausalLM(HyperCLOVAXForCausalLM):
        config_class = LadimoHyperClovaXConfig

        def __init__(self, config):
            super().__init__(config)
            install_ladimo_layers(self.model, config)
