"""Configuration of a ladimo export for transformers (`trust_remote_code`).

The base model's config (LLaMA or HyperCLOVA X) plus `ladimo_layers`: one entry per layer whose
FFN is not the plain dense one (an MoE block, or a dense FFN with activation sparsity), read by
modeling_ladimo.py. Written by `ladimo export --format hf-remote`.
"""

from transformers import LlamaConfig


class LadimoConfig(LlamaConfig):
    model_type = "ladimo_moe"


try:
    from transformers import HyperCLOVAXConfig
except ImportError:  # a transformers without HyperCLOVA X
    HyperCLOVAXConfig = None

if HyperCLOVAXConfig is not None:

    class LadimoHyperClovaXConfig(HyperCLOVAXConfig):
        model_type = "ladimo_moe"
