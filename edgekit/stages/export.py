"""The `export` stage: GGUF files (our F16 writer, then llama.cpp's quantizer; a QAT
student's planned mix written straight from its trained grid) and int4 ONNX."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from edgekit.formats import EXPORT_FORMATS, MIXES
from edgekit.fsutil import write_json
from edgekit.recipe.schema import StageConfig, student_needs_training
from edgekit.stages.context import RunContext
from edgekit.stages.outputs import DistillOutput, ExportOutput, QATOutput, QuantizeOutput
from edgekit.stages.registry import StageResult, register


class ExportConfig(StageConfig):
    type: Literal["export"]
    formats: list[Literal[EXPORT_FORMATS]] = ["f16", "q4_k_m"]
    model: Literal["student", "teacher"] = "student"
    # after a qat stage, the onnx_int4 folder holds: qat_grid = the trained grid itself (Q4_0 tensors
    # at 4 bits, 5-8-bit tensors at 8 bits: QAT's quality, larger and slower); int4 = the builder's own
    # int4 round-to-nearest (smallest and fastest, QAT's grid lost). For a QAT grid that is int4 all
    # through, train with `qat.mix: q4_0`.
    onnx_weights: Literal["qat_grid", "int4"] = "qat_grid"
    # llama.cpp's quantizations weighted by an importance matrix measured on `imatrix_rows` training
    # rows (never the holdout); also written as <name>.imatrix.gguf for `llama-quantize --imatrix`.
    # A QAT grid file is written exactly as trained and does not use it.
    imatrix: bool = False
    imatrix_rows: int = Field(64, ge=1)
    # the student is a draft for speculative decoding of the teacher: also export the teacher (the
    # target) in this GGUF format, and draft.json naming the pair (edgekit.runtime / serve load both)
    draft_target: Literal[tuple(MIXES)] | None = None

    @field_validator("formats")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError(f"export.formats is empty; list at least one of {', '.join(EXPORT_FORMATS)}")
        return v

    def recipe_problems(self, recipe) -> list[str]:
        return student_needs_training("export", self.model, recipe)


def onnx_weights(folder: Path) -> dict:
    """MatMulNBits nodes by bit width, and who made their weights (the builder or the QAT grid)."""
    import json

    import onnx

    from edgekit.export.onnx_export import WEIGHTS_NOTE

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    bits = Counter(f"MatMulNBits int{next((a.i for a in n.attribute if a.name == 'bits'), 4)}"
                   for n in model.graph.node if n.op_type == "MatMulNBits")
    note = folder / WEIGHTS_NOTE
    grid = json.loads(note.read_text())["grid"] if note.is_file() else {}
    return {"tensor_types": dict(bits), "writer": "edgekit (QAT grid)" if grid else "onnxruntime-genai builder",
            "qat_grid_nodes": len(grid)}


def file_metrics(path: Path, writer: str) -> dict:
    from edgekit.formats.gguf_read import tensor_table

    types = dict(Counter(t["type"] for t in tensor_table(path)))
    return {"file": path.name, "size_mb": round(path.stat().st_size / 2**20, 2), "tensor_types": types, "writer": writer}


def qat_grid(ctx: RunContext, cfg: ExportConfig) -> tuple[dict | None, dict | None]:
    """(plan, blocks) of the qat stage when the student is exported after one: the blocks of the
    tensors whose grid is not llama.cpp's plain quantization (learned scales, or scales searched
    with an importance matrix), None when there are none."""
    qat = ctx.get(QATOutput)
    if cfg.model != "student" or qat is None:
        return None, None
    plan, scales, importance = qat.plan_data(), qat.learned_scales(), qat.importances()
    if not scales and not importance:
        return plan, None
    from edgekit.quant.qat import learned_blocks  # pack those scales and their codes

    return plan, learned_blocks(qat.model, plan["plan"], scales, importance)


@register("export", ExportConfig, produces=ExportOutput, consumes=(DistillOutput, QATOutput, QuantizeOutput))
def run(ctx: RunContext, cfg: ExportConfig, out: Path) -> StageResult:
    from edgekit.export.bundle_readme import bundle_readme
    from edgekit.export.files import export_files

    name = f"{ctx.recipe.name}-{cfg.model}"
    plan, blocks = qat_grid(ctx, cfg)
    qat = ctx.get(QATOutput) if cfg.model == "student" else None
    src = ctx.teacher_path() if cfg.model == "teacher" else student_to_export(ctx, qat)
    imatrix = importance(ctx, cfg, src, out / f"{name}.imatrix.gguf") if cfg.imatrix else None
    files = export_files(src, out, name, cfg.formats, plan, blocks, onnx_grid=cfg.onnx_weights == "qat_grid",
                         imatrix=imatrix.means() if imatrix else None)
    outputs = ExportOutput(source=cfg.model, readme=out / "README.md",
                           gguf={f: out / p for f, p in files.items() if f != "onnx_int4"})
    metrics = {f"gguf_{f}": file_metrics(p, _writer(f, plan)) for f, p in outputs.gguf.items()}
    if "onnx_int4" in files:
        from edgekit.bench.speed import model_size

        outputs.onnx_int4 = out / files["onnx_int4"]
        metrics["onnx_int4"] = {"file": files["onnx_int4"], "size_mb": round(model_size(outputs.onnx_int4) / 2**20, 2),
                                **onnx_weights(outputs.onnx_int4)}
    if qat is not None:
        # the PTQ baseline: the student trained as long without QAT (the qat stage's float twin,
        # else what QAT started from), through llama.cpp's own quantizer
        base = export_files(qat.float_model or ctx.student_path(), out, f"{name}-ptq",
                            [f for f in cfg.formats if f != "onnx_int4"])
        outputs.ptq_gguf = {f: out / p for f, p in base.items()}
        metrics |= {f"ptq_gguf_{f}": file_metrics(p, "edgekit" if f in ("f16", "f32") else "llama.cpp")
                    for f, p in outputs.ptq_gguf.items()}
    pair = None
    if cfg.draft_target:
        target = export_files(ctx.teacher_path(), out, f"{ctx.recipe.name}-target", [cfg.draft_target])[cfg.draft_target]
        draft = next(f for f in files.values() if f.endswith(".gguf"))
        pair = {"target": target, "draft": draft, "draft_tokens": 4}
        write_json(out / "draft.json", pair)
        files[f"target_{cfg.draft_target}"] = target
        metrics[f"target_{cfg.draft_target}"] = file_metrics(out / target, "llama.cpp")
    ptq = ctx.get(QuantizeOutput)
    (out / "README.md").write_text(bundle_readme(name, files, {k: p.name for k, p in ptq.files.items()} if ptq else None, pair))
    publish = {f: f"export/{f}" for f in files.values()} | {"README.md": "export/README.md"}
    if pair:
        publish["draft.json"] = "export/draft.json"
    if imatrix:
        outputs.imatrix = out / f"{name}.imatrix.gguf"
        publish[outputs.imatrix.name] = f"export/{outputs.imatrix.name}"
        metrics["imatrix"] = {"file": outputs.imatrix.name, "size_mb": round(outputs.imatrix.stat().st_size / 2**20, 2),
                              "tensor_types": {"importance matrix (F32)": len(imatrix.sums)},
                              "rows": imatrix.tokens // imatrix.chunk_size, "tokens": imatrix.tokens,
                              "used_by": [k for k, v in metrics.items() if v.get("writer") == "llama.cpp" and not k.startswith("ptq_")]}
    return StageResult(outputs, metrics, publish)


def student_to_export(ctx: RunContext, qat: QATOutput | None) -> Path:
    """The newest student: QAT's latent weights if a qat stage ran, else the distilled one."""
    if qat is not None:
        return qat.model
    distilled = ctx.get(DistillOutput)
    if distilled is None:
        from edgekit.errors import EdgekitError

        raise EdgekitError("export.model is 'student' but no stage of this run trained one",
                           "add a distill stage, or set export.model: teacher")
    return distilled.model


def _writer(fmt: str, plan: dict | None) -> str:
    """Who wrote an exported GGUF: edgekit (floats, or a QAT grid) or llama.cpp's quantizer."""
    if plan and fmt == plan["mix"]:
        return "edgekit (QAT grid)"
    return "edgekit" if fmt in ("f16", "f32") else "llama.cpp"


def importance(ctx: RunContext, cfg: ExportConfig, src: Path, path: Path):
    """The importance matrix of the model in `src` on the recipe's training rows, saved to `path`."""
    from edgekit.data.tokens import spread
    from edgekit.quant.imatrix import collect

    rows = spread(ctx.rows("train"), cfg.imatrix_rows)
    im = collect(ctx.load_model(src), src, rows, ctx.recipe.data.train)
    im.save(path)
    return im
