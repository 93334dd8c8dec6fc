"""Load transformers models safely: safetensors only, remote code only when asked."""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError


LOAD_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def quantization_config(load: str):
    """transformers' BitsAndBytesConfig for a frozen model loaded as NF4 or int8 weights
    (bitsandbytes). Compute stays in float32: bf16/fp16 matmuls are slow on CPUs."""
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise EdgekitError(f"teacher.load: {load} needs bitsandbytes",
                           "pip install 'edgekit[lean]' (bitsandbytes==0.50.2), or use load: fp32 / bf16 / fp16") from None
    if load == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_causal_lm(path: Path, dtype: str = "float32", trust_remote_code: bool = False, load: str | None = None):
    """A transformers causal LM from a local directory. `load` (fp32 | fp16 | bf16 | nf4 | int8)
    overrides `dtype`; nf4/int8 load the Linear weights through bitsandbytes (frozen use only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.models.sources import refuse_pickles

    refuse_pickles(path)
    extra = {}
    if load in LOAD_DTYPES:
        dtype = LOAD_DTYPES[load]
    elif load is not None:
        extra = {"quantization_config": quantization_config(load), "device_map": "cpu" if not torch.cuda.is_available() else "auto"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, **extra)
    except Exception as e:
        raise EdgekitError(f"could not load the model in {path}: {type(e).__name__}: {str(e).splitlines()[0]}",
                           "check the directory holds a complete transformers model (config.json + safetensors)") from None
    if load in ("nf4", "int8"):
        from edgekit.models.int8_rows import int8_embeddings, own_memory

        int8_embeddings(model)
        own_memory(model)  # whatever the layout: release the mapped file the quantizing load read
    return model.eval()


def save_model(model, tokenizer_dir: Path, out: Path) -> None:
    """The model as safetensors + config + the tokenizer files of `tokenizer_dir`. A model
    FSDP left sharded is gathered (every process calls this) and rank 0 writes it."""
    from edgekit.models.student import copy_tokenizer_files
    from edgekit.parallel import gathered_weights

    weights = gathered_weights(model)
    if weights == {}:  # another rank's share of a sharded model: rank 0 writes the whole
        return
    model.save_pretrained(out, safe_serialization=True, state_dict=weights)
    copy_tokenizer_files(tokenizer_dir, out)
