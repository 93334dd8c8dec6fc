"""The `export` stage: GGUF files (our F16 writer, then llama.cpp's quantizer; a QAT
student's planned mix written straight from its trained grid) and int4 ONNX."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from edgekit.bench.speed import model_size
from edgekit.export.bundle_readme import bundle_readme
from edgekit.export.gguf_read import tensor_table
from edgekit.export.onnx_export import WEIGHTS_NOTE, export_onnx_int4
from edgekit.export.gguf_write import write_gguf
from edgekit.export.llama_quantize import FILE_TYPE_NAMES, quantize_gguf
from edgekit.pipeline import RunContext, stage
from edgekit.progress import status


def model_to_export(ctx: RunContext, which: str) -> Path:
    """The teacher, or the newest student: QAT's latent weights if a qat stage ran."""
    if which == "teacher":
        return ctx.teacher_path()
    return ctx.output("qat" if "qat" in ctx.finished else "distill", "model")


def export_gguf(src: Path, out: Path, name: str, formats: list[str], plan: dict | None = None,
                blocks: dict | None = None, onnx_grid: bool = False, imatrix: dict | None = None) -> dict[str, str]:
    """Write `formats` of the model in `src` as <name>-<TYPE>.gguf; {format: file name}.
    `plan` ({"mix": fmt, "plan": {weight: GGML type}}, from a qat stage) makes the `mix`
    file be written from the trained grid by edgekit's exact quantizers, not by llama.cpp;
    `blocks` (QAT with learned scales) are packed as they are in that file; `onnx_grid` puts the
    same trained grid into the ONNX folder's MatMulNBits weights; `imatrix` ({GGUF tensor name:
    mean squared activation per column}) weights llama.cpp's quantizations."""
    gguf_formats = [f for f in formats if f != "onnx_int4"]
    files = {}
    if "onnx_int4" in formats:
        target = out / f"{name}-int4-onnx"
        with status(f"building {target.name} with onnxruntime-genai's model builder"):
            export_onnx_int4(src, target, qat_grid=(plan["plan"], blocks) if plan and onnx_grid else None)
        files["onnx_int4"] = target.name
    if not gguf_formats:
        return files
    formats = gguf_formats
    float_fmt = "f32" if "f32" in formats else "f16"
    base = out / f"{name}-{FILE_TYPE_NAMES[float_fmt]}.gguf"
    with status(f"writing {base.name}"):
        write_gguf(src, base, float_fmt, name=name)
    if float_fmt in formats:
        files[float_fmt] = base.name
    for fmt in formats:
        if fmt not in ("f32", "f16"):
            target = out / f"{name}-{FILE_TYPE_NAMES[fmt]}.gguf"
            if plan and plan["mix"] == fmt:
                with status(f"writing {target.name} from the QAT grid (no second quantization)"):
                    write_gguf(src, target, fmt, name=name, types=plan["plan"], blocks=blocks)
            else:
                with status(f"quantizing to {target.name} with llama.cpp" + (" and an importance matrix" if imatrix else "")):
                    quantize_gguf(base, target, fmt, imatrix=imatrix)
            files[fmt] = target.name
    if float_fmt not in formats:
        base.unlink()
    return files


def onnx_weights(folder: Path) -> dict:
    """MatMulNBits nodes by bit width, and who made their weights (the builder or the QAT grid)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    bits = Counter(f"MatMulNBits int{next((a.i for a in n.attribute if a.name == 'bits'), 4)}"
                   for n in model.graph.node if n.op_type == "MatMulNBits")
    note = folder / WEIGHTS_NOTE
    grid = json.loads(note.read_text())["grid"] if note.is_file() else {}
    return {"tensor_types": dict(bits), "writer": "edgekit (QAT grid)" if grid else "onnxruntime-genai builder",
            "qat_grid_nodes": len(grid)}


def _writer(output_key: str, plan: dict | None) -> str:
    """Who wrote an exported GGUF: edgekit (floats, or a QAT grid) or llama.cpp's quantizer."""
    if plan and output_key == f"gguf_{plan['mix']}":
        return "edgekit (QAT grid)"
    fmt = output_key.removeprefix("ptq_").removeprefix("gguf_")
    return "edgekit" if fmt in ("f16", "f32") else "llama.cpp"


@stage("export")
def run_export(ctx: RunContext, cfg, out: Path) -> dict:
    name = f"{ctx.recipe.name}-{cfg.model}"
    plan, blocks = None, None
    if cfg.model == "student" and "qat" in ctx.finished:
        plan = json.loads(ctx.output("qat", "plan").read_text())
        from edgekit.quant.stage import saved_scales

        scales = saved_scales(ctx)
        if scales:  # learned scales: pack them and their codes
            from edgekit.quant.qat import learned_blocks

            blocks = learned_blocks(ctx.output("qat", "model"), plan["plan"], scales)
    src = model_to_export(ctx, cfg.model)
    imatrix = importance(ctx, cfg, src, out / f"{name}.imatrix.gguf") if cfg.imatrix else None
    files = export_gguf(src, out, name, cfg.formats, plan, blocks, onnx_grid=cfg.onnx_weights == "qat_grid",
                        imatrix=imatrix.means() if imatrix else None)
    outputs = {(fmt if fmt == "onnx_int4" else f"gguf_{fmt}"): f for fmt, f in files.items()}
    if "qat" in ctx.finished and cfg.model == "student":
        # the PTQ baseline: the student trained as long without QAT (the qat stage's float twin,
        # else what QAT started from: the distilled student, or the teacher itself), through
        # llama.cpp's own quantizer
        from edgekit.quant.stage import student_source

        outs = ctx.finished["qat"]["outputs"]
        twin = ctx.output("qat", "float_model") if "float_model" in outs else student_source(ctx)
        base = export_gguf(twin, out, f"{name}-ptq", [f for f in cfg.formats if f != "onnx_int4"])
        outputs.update({f"ptq_gguf_{fmt}": f for fmt, f in base.items()})
    metrics = {}
    for key, fname in outputs.items():
        if key == "onnx_int4":
            metrics[key] = {"file": fname, "size_mb": round(model_size(out / fname) / 2**20, 2), **onnx_weights(out / fname)}
            continue
        types = dict(Counter(t["type"] for t in tensor_table(out / fname)))
        metrics[key] = {"file": fname, "size_mb": round((out / fname).stat().st_size / 2**20, 2), "tensor_types": types,
                        "writer": _writer(key, plan)}
    ptq = {k: v["path"] for k, v in ctx.finished["quantize"]["outputs"].items()} if "quantize" in ctx.finished else None
    (out / "README.md").write_text(bundle_readme(name, files, ptq))
    publish = {f: f"export/{f}" for f in files.values()} | {"README.md": "export/README.md"}
    if imatrix:
        outputs["imatrix"] = f"{name}.imatrix.gguf"
        publish[outputs["imatrix"]] = f"export/{outputs['imatrix']}"
        metrics["imatrix"] = {"file": outputs["imatrix"], "size_mb": round((out / outputs["imatrix"]).stat().st_size / 2**20, 2),
                              "tensor_types": {"importance matrix (F32)": len(imatrix.sums)},
                              "rows": imatrix.tokens // imatrix.chunk_size, "tokens": imatrix.tokens,
                              "used_by": [k for k, v in metrics.items() if v.get("writer") == "llama.cpp" and not k.startswith("ptq_")]}
    return {"outputs": outputs | {"readme": "README.md"}, "metrics": metrics, "publish": publish}


def importance(ctx: RunContext, cfg, src: Path, path: Path):
    """The importance matrix of the model in `src` on the recipe's training rows, saved to `path`."""
    from edgekit.quant.imatrix import collect

    rows = ctx.rows("train")[: cfg.imatrix_rows]
    im = collect(ctx.load_model(src), src, rows, ctx.recipe.data.train)
    im.save(path)
    return im

