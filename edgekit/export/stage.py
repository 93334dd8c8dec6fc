"""The `export` stage: GGUF files (our F16 writer, then llama.cpp's quantizer)."""

from __future__ import annotations

from pathlib import Path

from edgekit.export.gguf_read import tensor_table
from edgekit.export.gguf_write import write_gguf
from edgekit.export.llama_quantize import FILE_TYPE_NAMES, quantize_gguf
from edgekit.pipeline import RunContext, stage
from edgekit.progress import status


def model_to_export(ctx: RunContext, which: str) -> Path:
    return ctx.teacher_path() if which == "teacher" else ctx.output("distill", "model")


@stage("export")
def run_export(ctx: RunContext, cfg, out: Path) -> dict:
    src = model_to_export(ctx, cfg.model)
    name = f"{ctx.recipe.name}-{cfg.model}"
    float_fmt = "f32" if "f32" in cfg.formats else "f16"
    base = out / f"{name}-{FILE_TYPE_NAMES[float_fmt]}.gguf"
    with status(f"writing {base.name}"):
        write_gguf(src, base, float_fmt, name=name)
    outputs, metrics = {}, {}
    if float_fmt in cfg.formats:
        outputs[f"gguf_{float_fmt}"] = base.name
    for fmt in cfg.formats:
        if fmt in ("f32", "f16"):
            continue
        target = out / f"{name}-{FILE_TYPE_NAMES[fmt]}.gguf"
        with status(f"quantizing to {target.name} with llama.cpp"):
            quantize_gguf(base, target, fmt)
        outputs[f"gguf_{fmt}"] = target.name
    if float_fmt not in cfg.formats:
        base.unlink()
    for key, fname in outputs.items():
        types: dict[str, int] = {}
        for t in tensor_table(out / fname):
            types[t["type"]] = types.get(t["type"], 0) + 1
        metrics[key] = {"file": fname, "size_mb": round((out / fname).stat().st_size / 2**20, 2), "tensor_types": types}
    return {"outputs": outputs, "metrics": metrics, "publish": {f: f"export/{f}" for f in outputs.values()}}
