"""The `quantize` stage (post-training quantization): GPTQ and AWQ int4 checkpoints
(llm-compressor) and the same two methods carried into GGUF, each artifact checked in its
own runtime against the PyTorch model it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from edgekit.formats import EXACT_MIXES
from edgekit.recipe.schema import StageConfig, student_needs_training
from edgekit.stages.context import RunContext
from edgekit.stages.outputs import DistillOutput, QATOutput, QuantizeOutput
from edgekit.stages.registry import StageResult, register


class QuantizeConfig(StageConfig):
    """Post-training quantization (PTQ): GPTQ and AWQ int4 checkpoints through llm-compressor,
    and both methods carried into GGUF (GPTQ run on the GGUF grid; AWQ scales folded into
    the norms before GGUF quantization). Calibrated on the recipe's train split, never the holdout."""
    type: Literal["quantize"]
    methods: list[Literal["gptq", "awq"]] = Field(["gptq", "awq"], min_length=1)
    gguf: list[Literal[EXACT_MIXES]] = ["q4_k_m"]  # GGUF mixes to write per method; [] for none
    model: Literal["student", "teacher"] = "student"  # student: the float student QAT is compared with
    calibration_rows: int = Field(64, ge=1)  # rows of data.seq_len tokens from the train split (GPTQ)
    awq_rows: int = Field(16, ge=1)  # AWQ's search runs every layer block once per grid point: ~1 min/layer at 64 rows on 2 CPU cores
    group_size: int | None = Field(None, ge=8)  # int4 group; unset: largest of 128/64/32 dividing every width
    damp: float = Field(0.01, gt=0.0, le=1.0)  # GPTQ: dampening, as a fraction of the mean Hessian diagonal
    awq_grid: int = Field(10, ge=2)  # AWQ: scale exponents tried per layer group (llm-compressor's default is 20)
    parity_rows: int = Field(4, ge=1)  # holdout rows each artifact is checked on in its runtime

    def recipe_problems(self, recipe) -> list[str]:
        return student_needs_training("quantize", self.model, recipe)


def model_to_quantize(ctx: RunContext, which: str) -> Path:
    """The teacher, or the float student: QAT's float twin when a qat stage trained one (so
    PTQ and QAT-KD start from equally trained weights), else the distilled student."""
    if which == "teacher":
        return ctx.teacher_path()
    qat = ctx.get(QATOutput)
    if qat is not None and qat.float_model is not None:
        return qat.float_model
    return ctx.get(DistillOutput).model


def agreement(candidate, reference, rows) -> dict:
    """KL(reference || candidate) and top-1 agreement on holdout rows."""
    from edgekit.bench.quality import evaluate

    result = evaluate({"candidate": candidate, "reference": reference}, rows, [("candidate", "reference")], desc="check")
    return {k: round(v, 6) for k, v in result["candidate|reference"].items()}


@register("quantize", QuantizeConfig, produces=QuantizeOutput, consumes=(DistillOutput, QATOutput))
def run(ctx: RunContext, cfg: QuantizeConfig, out: Path) -> StageResult:
    from edgekit.bench.llama_runner import llama_scorer
    from edgekit.bench.quality import torch_scorer
    from edgekit.bench.speed import model_size
    from edgekit.data.tokens import spread
    from edgekit.quant.ptq import artifacts, require_llmcompressor

    require_llmcompressor()
    src = model_to_quantize(ctx, cfg.model)
    calib = spread(ctx.rows("train"), cfg.calibration_rows)  # over the whole train split; never the holdout
    if calib.shape[0] < cfg.calibration_rows:
        print(f"quantize: the train split has {calib.shape[0]} rows of {calib.shape[1]} tokens; "
              f"calibrating on those (calibration_rows is {cfg.calibration_rows})")
    holdout = ctx.rows("holdout")[: cfg.parity_rows]
    reference = torch_scorer(ctx.load_model(src))
    result = StageResult(QuantizeOutput(), {"source": src.name, "calibration_rows": int(calib.shape[0])})
    for key, path, info, grid_model in artifacts(src, out, f"{ctx.recipe.name}-{cfg.model}", cfg.methods, cfg.gguf, calib,
                                                 ctx.recipe.teacher.dtype, cfg.group_size, cfg.damp, cfg.awq_grid,
                                                 cfg.awq_rows):
        # in its own runtime, as its users will run it: transformers for checkpoints, llama.cpp for GGUF
        runtime = llama_scorer(path, ctx=holdout.shape[1]) if path.suffix == ".gguf" else torch_scorer(ctx.load_model(path))
        checks = {"vs_source": agreement(runtime, reference, holdout)}  # what quantization cost
        if grid_model is not None:  # parity with PyTorch on the file's own grid: a packing error shows here
            checks["parity_vs_pytorch_grid"] = agreement(runtime, torch_scorer(grid_model()), holdout)
        result.outputs.files[key] = path
        result.publish[path.name] = f"export/{path.name}"
        result.metrics[key] = {"file": path.name, "size_mb": round(model_size(path) / 2**20, 2), **info, **checks}
    return result
