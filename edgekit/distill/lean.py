"""Memory-lean training parts, from the standard libraries: 8-bit AdamW (bitsandbytes)
and LoRA adapter students (peft). The NF4/int8 teacher is in `models.loading`."""

from __future__ import annotations

from typing import Callable

import torch

from edgekit.errors import EdgekitError

def make_optimizer(params, name: str, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW with fp32 states (8 bytes/parameter) or bitsandbytes' blockwise 8-bit states
    (2 bytes/parameter). Paged states only page on CUDA; on CPU bitsandbytes runs them unpaged.
    `fused`: PyTorch's fused AdamW kernel (the default of transformers' Trainer, and so TRL's):
    on a 2-core CPU 0.15 s per step of a 175M-parameter student where PyTorch's default (on a
    CPU, a loop over the tensors) takes 1.3 s; sharded (DTensor) parameters keep the default."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise EdgekitError(f"optimizer: {name} needs bitsandbytes",
                           "pip install 'edgekit[lean]' (bitsandbytes==0.50.2), or use optimizer: adamw") from None
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        return cls(params, lr=lr, weight_decay=weight_decay)


def with_lora(model, spec) -> tuple[torch.nn.Module, Callable[[], torch.nn.Module]]:
    """Inject LoRA adapters (peft) into `model`, base weights frozen. Returns the model to
    train (the same module, adapters inside) and `merge()`, which folds the adapters into
    the weights and returns a plain transformers model: exported files carry no adapter."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise EdgekitError("lora: needs peft", "pip install 'edgekit[lean]' (peft==0.21.2), or remove lora:") from None
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in spec.targets if t not in present]
    if missing:
        raise EdgekitError(f"lora.targets {missing} name no Linear layer of the student",
                           f"the student's Linear layers are {sorted(present)}")
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.targets),
                     bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    return peft_model.base_model.model, lambda: peft_model.merge_and_unload()


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
