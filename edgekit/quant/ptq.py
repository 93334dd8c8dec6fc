"""Post-training quantization: GPTQ and AWQ int4 checkpoints, and both methods carried into GGUF.

Checkpoints come from llm-compressor (vLLM project), the maintained successor of AutoGPTQ
(archived) and AutoAWQ (deprecated): `GPTQModifier` (symmetric int4 groups) and
`AWQModifier` (asymmetric int4 groups, scales searched on calibration activations and
folded into the preceding norms / projections), saved in the compressed-tensors format
that plain transformers and vLLM load.

llama.cpp's converter cannot carry either into GGUF (it dequantizes GPTQ groups and rejects
AWQ), so edgekit does it:
- GPTQ -> GGUF: GPTQ's error compensation run against the GGUF grid itself (`gptq.py`),
  codes and scales packed as found;
- AWQ -> GGUF: the AWQ-smoothed float weights (scales already folded into the norms) are
  quantized by the exact llama.cpp quantizers with the mix's per-tensor types.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from edgekit.errors import EdgekitError

QUANT_PARAM_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")


def require_llmcompressor():
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        raise EdgekitError("the quantize stage (GPTQ / AWQ checkpoints) needs llm-compressor",
                           "pip install 'edgekit[ptq]' (llmcompressor==0.14.0.1)") from None


def linear_widths(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, int]:
    return {n: m.in_features for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip}


def pick_group_size(model: nn.Module, requested: int | None) -> int:
    """The requested int4 group size, or the largest of 128, 64, 32 that divides every
    quantized layer's input width (SmolLM2's 576 takes 64)."""
    widths = linear_widths(model)
    if requested is not None:
        bad = sorted({w for w in widths.values() if w % requested})
        if bad:
            fits = [g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths.values())]
            raise EdgekitError(f"quantize.group_size {requested} does not divide the input widths {bad} of this model",
                               f"use group_size {fits[0] if fits else 'null'} (or leave it unset to choose)")
        return requested
    for g in (128, 64, 32, 16):
        if all(w % g == 0 for w in widths.values()):
            return g
    raise EdgekitError(f"no int4 group size in 128/64/32/16 divides this model's layer widths {sorted(set(widths.values()))}",
                       "quantize this model with llama.cpp's GGUF formats instead (export stage)")


@contextlib.contextmanager
def _cpu_safe():
    """llm-compressor's AWQ pins cached activations for faster host-to-device copies, which
    fails without an accelerator; on CPU pinning buys nothing, so it is skipped."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def oneshot_int4(model: nn.Module, method: str, rows: torch.Tensor, group_size: int, damp: float = 0.01,
                 awq_grid: int = 10) -> None:
    """Run llm-compressor's GPTQ or AWQ on `model` in place over calibration rows (N, T).
    After it, GPTQ leaves the quantized weights and AWQ the smoothed float weights in the
    Linear modules, each with its int4 scales attached for `save_checkpoint`."""
    require_llmcompressor()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.logger import LoggerConfig, configure_logger

    configure_logger(LoggerConfig(console_log_level="ERROR"))  # its per-layer METRIC lines (level 38) are noise here
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=(method == "gptq"), strategy="group",
                               group_size=group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=damp)
    elif method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier

        # AWQ smooths (scales searched against this int4 scheme); the quantization modifier rounds
        recipe = [AWQModifier(n_grid=awq_grid), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    else:
        raise ValueError(f"unknown method {method}")
    ids = rows.tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    with _cpu_safe():
        oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=rows.shape[1],
                num_calibration_samples=rows.shape[0])


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own weights without the int4 parameters llm-compressor attached."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(QUANT_PARAM_SUFFIXES)}


def save_checkpoint(model: nn.Module, tokenizer_dir: Path, out: Path) -> None:
    """compressed-tensors int4 checkpoint (packed int4 + scales) that transformers reloads.
    Tensors left unquantized (embeddings, norms) and the scales are stored in fp16, as
    published GPTQ/AWQ checkpoints are: fp32 would double the embedding table's bytes."""
    from edgekit.models.student import copy_tokenizer_files

    if next(model.parameters()).dtype == torch.float32:
        model.to(torch.float16)
    model.save_pretrained(out, save_compressed=True)
    copy_tokenizer_files(tokenizer_dir, out)


def save_float(state: dict[str, torch.Tensor], src: Path, out: Path, dtype: str) -> Path:
    """A plain transformers model directory: `src`'s config and tokenizer with these weights."""
    from edgekit.models.loading import load_causal_lm, save_model

    model = load_causal_lm(src, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise EdgekitError(f"the smoothed weights do not fit {src}: missing {missing[:3]}, unexpected {unexpected[:3]}",
                           "this is a bug in edgekit's AWQ path; please report it")
    save_model(model, src, out)
    return out


# ---------------------------------------------------------------- GPTQ / AWQ into GGUF

def gguf_targets(model: nn.Module, plan: dict[str, str], tied: bool) -> list[str]:
    """Linear layers whose planned GGUF type has an exact quantizer: GPTQ runs on these.
    A tied output head is the embedding table in the file, so it keeps plain rounding."""
    from edgekit.formats.ggml_blocks import GGML_TYPES

    names = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and plan.get(f"{n}.weight") in GGML_TYPES and not (tied and n == "lm_head"):
            names.append(n)
    return names


def gptq_gguf_blocks(model: nn.Module, plan: dict[str, str], rows: torch.Tensor, tied: bool,
                     damp: float = 0.01) -> dict[str, object]:
    """{weight name: blocks} for every Linear of the plan, by GPTQ on its GGUF type."""
    from edgekit.formats.ggml_blocks import GGML_TYPES
    from edgekit.quant.gptq import gptq, input_hessians

    names = gguf_targets(model, plan, tied)
    hessians = input_hessians(model, rows, names, desc="GPTQ->GGUF: input statistics")
    modules = dict(model.named_modules())
    blocks = {}
    for n in tqdm(names, desc="GPTQ->GGUF: quantizing", unit="layer"):
        key = f"{n}.weight"
        blocks[key] = gptq(modules[n].weight, hessians.pop(n), GGML_TYPES[plan[key]], damp)
    return blocks


def on_file_grid(model: nn.Module, plan: dict[str, str], blocks: dict[str, object] | None = None) -> nn.Module:
    """`model` computing with the weights a GGUF of this plan holds: GPTQ blocks decoded
    where given, every other planned weight through the exact quantizer (fake-quant)."""
    from edgekit.quant.qat import prepare, strip

    blocks = blocks or {}
    load_blocks(model, blocks)
    prepare(model, {k: v for k, v in plan.items() if k not in blocks})
    return strip(model, on_grid=True)


def load_blocks(model: nn.Module, blocks: dict[str, object]) -> None:
    """Set each named weight to its quantized blocks, decoded."""
    from edgekit.formats.ggml_blocks import dequantize_exact

    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, blk in blocks.items():
            params[key].copy_(dequantize_exact(blk).to(params[key].dtype))


# ---------------------------------------------------------------- every PTQ artifact of a model

def artifacts(src: Path, out: Path, name: str, methods: list[str], mixes: list[str], calib: torch.Tensor,
              dtype: str = "float32", group_size: int | None = None, damp: float = 0.01, awq_grid: int = 10,
              awq_rows: int = 16):
    """Write the GPTQ / AWQ checkpoints of the model in `src` and their GGUFs (`mixes`) into
    `out`; yield (key, path, info, grid_model) per artifact as it is finished. `grid_model()`
    builds the PyTorch model computing on a GGUF's own grid (None for checkpoints).
    GPTQ calibrates on all `calib` rows, AWQ on the first `awq_rows` of them."""
    import json
    import time

    from edgekit.export.gguf_write import write_gguf
    from edgekit.formats import file_label
    from edgekit.fsutil import release_memory
    from edgekit.models.loading import load_causal_lm
    from edgekit.progress import status
    from edgekit.quant.qat import plan_types

    tied = json.loads((src / "config.json").read_text()).get("tie_word_embeddings", False)
    smoothed = None
    for method in methods:
        t0 = time.perf_counter()
        model = load_causal_lm(src, dtype)
        group = pick_group_size(model, group_size)
        rows = calib[:awq_rows] if method == "awq" else calib
        with status(f"{method.upper()} int4 (group {group}) with llm-compressor on {rows.shape[0]} calibration rows"):
            oneshot_int4(model, method, rows, group, damp, awq_grid)
        if method == "awq" and mixes:
            smoothed = save_float(float_state(model), src, out / "awq_smoothed", dtype)
        target = out / f"{name}-{method}"
        save_checkpoint(model, src, target)
        del model
        release_memory()
        yield method, target, {"format": f"compressed-tensors int4 g{group}", "runtime": "transformers",
                               "calibration_rows": int(rows.shape[0]),
                               "symmetric": method == "gptq", "seconds": round(time.perf_counter() - t0, 1)}, None

    for mix in mixes:
        plan = plan_types(src, mix)
        kind = file_label(mix)
        if "gptq" in methods:
            t0 = time.perf_counter()
            model = load_causal_lm(src, dtype)
            blocks = gptq_gguf_blocks(model, plan, calib, tied, damp)
            target = out / f"{name}-gptq-{kind}.gguf"
            with status(f"writing {target.name} (GPTQ on the GGUF grid)"):
                write_gguf(src, target, mix, name=f"{name}-gptq", types=plan, blocks=blocks)
            yield (f"gptq_gguf_{mix}", target, {"format": kind, "runtime": "llama.cpp", "gptq_layers": len(blocks),
                                                "seconds": round(time.perf_counter() - t0, 1)},
                   lambda model=model, plan=plan, blocks=blocks: on_file_grid(model, plan, blocks))
            del model, blocks
        if smoothed is not None:
            t0 = time.perf_counter()
            target = out / f"{name}-awq-{kind}.gguf"
            with status(f"writing {target.name} (AWQ-smoothed weights, exact llama.cpp quantizers)"):
                write_gguf(smoothed, target, mix, name=f"{name}-awq", types=plan)
            yield (f"awq_gguf_{mix}", target, {"format": kind, "runtime": "llama.cpp",
                                               "seconds": round(time.perf_counter() - t0, 1)},
                   lambda plan=plan: on_file_grid(load_causal_lm(smoothed, dtype), plan))
