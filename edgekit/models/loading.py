"""Load transformers models safely: safetensors only, remote code only when asked."""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError


def load_causal_lm(path: Path, dtype: str = "float32", trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.models.sources import refuse_pickles

    refuse_pickles(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:
        raise EdgekitError(f"could not load the model in {path}: {type(e).__name__}: {str(e).splitlines()[0]}",
                           "check the directory holds a complete transformers model (config.json + safetensors)") from None
    return model.eval()
