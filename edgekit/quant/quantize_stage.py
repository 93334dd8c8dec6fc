"""The `quantize` stage: GPTQ and AWQ int4 checkpoints (llm-compressor) and the same two
methods carried into GGUF, each artifact checked in its own runtime against the PyTorch
model it came from."""

from __future__ import annotations

from pathlib import Path

from edgekit.bench.quality import evaluate, torch_scorer
from edgekit.bench.speed import model_size
from edgekit.pipeline import RunContext, stage


def model_to_quantize(ctx: RunContext, which: str) -> Path:
    """The teacher, or the float student: QAT's float twin when a qat stage trained one (so
    PTQ and QAT-KD start from equally trained weights), else the distilled student."""
    if which == "teacher":
        return ctx.teacher_path()
    if "qat" in ctx.finished and "float_model" in ctx.finished["qat"]["outputs"]:
        return ctx.output("qat", "float_model")
    return ctx.output("distill", "model")


def agreement(candidate, reference, rows) -> dict:
    """KL(reference || candidate) and top-1 agreement on holdout rows."""
    result = evaluate({"candidate": candidate, "reference": reference}, rows, [("candidate", "reference")], desc="check")
    return {k: round(v, 6) for k, v in result["candidate|reference"].items()}


@stage("quantize")
def run_quantize(ctx: RunContext, cfg, out: Path) -> dict:
    from edgekit.bench.llama_runner import llama_scorer
    from edgekit.quant.ptq import artifacts, require_llmcompressor

    require_llmcompressor()
    src = model_to_quantize(ctx, cfg.model)
    calib = ctx.rows("train")[: cfg.calibration_rows]  # never the holdout
    if calib.shape[0] < cfg.calibration_rows:
        print(f"quantize: the train split has {calib.shape[0]} rows of {calib.shape[1]} tokens; "
              f"calibrating on those (calibration_rows is {cfg.calibration_rows})")
    holdout = ctx.rows("holdout")[: cfg.parity_rows]
    reference = torch_scorer(ctx.load_model(src))
    outputs, publish = {}, {}
    metrics = {"source": src.name, "calibration_rows": int(calib.shape[0])}
    for key, path, info, grid_model in artifacts(src, out, f"{ctx.recipe.name}-{cfg.model}", cfg.methods, cfg.gguf, calib,
                                                 ctx.recipe.teacher.dtype, cfg.group_size, cfg.damp, cfg.awq_grid,
                                                 cfg.awq_rows):
        # in its own runtime, as its users will run it: transformers for checkpoints, llama.cpp for GGUF
        runtime = llama_scorer(path, ctx=holdout.shape[1]) if path.suffix == ".gguf" else torch_scorer(ctx.load_model(path))
        checks = {"vs_source": agreement(runtime, reference, holdout)}  # what quantization cost
        if grid_model is not None:  # parity with PyTorch on the file's own grid: a packing error shows here
            checks["parity_vs_pytorch_grid"] = agreement(runtime, torch_scorer(grid_model()), holdout)
        outputs[key] = path.name
        publish[path.name] = f"export/{path.name}"
        metrics[key] = {"file": path.name, "size_mb": round(model_size(path) / 2**20, 2), **info, **checks}
    return {"outputs": outputs, "metrics": metrics, "publish": publish}
