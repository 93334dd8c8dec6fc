"""The `qat` stage: the distilled student, fake-quantized on llama.cpp's exact grid,
trained against the full-precision teacher with the distillation losses."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from edgekit.distill.stage import save_model
from edgekit.distill.trainer import KDSettings, train
from edgekit.pipeline import RunContext, stage
from edgekit.quant.qat import learned_scales, plan_types, prepare, strip


def student_source(ctx: RunContext) -> Path:
    return ctx.output("distill", "model") if "distill" in ctx.finished else ctx.teacher_path()


def saved_scales(ctx: RunContext) -> dict | None:
    """The qat stage's learned block scales ({weight name: fp16 scales}), or None when it
    recomputed them."""
    if "scales" not in ctx.finished["qat"]["outputs"]:
        return None
    from safetensors.torch import load_file

    return load_file(ctx.output("qat", "scales"))


@stage("qat")
def run_qat(ctx: RunContext, cfg, out: Path) -> dict:
    src = student_source(ctx)
    plan = plan_types(src, cfg.mix)
    student = ctx.load_model(src)
    rows, mask = ctx.rows_and_mask("train")
    init = {}
    if cfg.init == "gptq":
        init = gptq_init(student, plan, rows[: cfg.calibration_rows], cfg.damp)
    coverage = prepare(student, plan, cfg.scales, scale_lr_ratio=cfg.scale_lr / cfg.lr)
    if cfg.activations == "llama_cpp":
        from edgekit.quant.act_rounding import llama_cpp_activations

        llama_cpp_activations(student, plan)  # forward hooks: not part of the saved weights
    settings = KDSettings.from_config(cfg)
    holdout = ctx.rows("holdout")[: cfg.eval_rows] if cfg.eval_every else None
    last = train(student, ctx.teacher(), rows, settings, out, desc="qat", mask=mask, holdout=holdout)
    scales = learned_scales(student)
    strip(student)
    save_model(student, src, out / "model")
    outputs = {"model": "model", "plan": "qat_plan.json"}
    if scales:  # the learned block scales: the export packs them, evaluation rebuilds the grid from them
        from safetensors.torch import save_file

        save_file(scales, str(out / "qat_scales.safetensors"))
        outputs["scales"] = "qat_scales.safetensors"
    twin_last = None
    if "float" in cfg.baselines:
        del student
        twin = ctx.load_model(src)
        twin_last = train(twin, ctx.teacher(), rows, settings, out / "float_twin", desc="float twin (no QAT)", mask=mask,
                          holdout=holdout)
        save_model(twin, src, out / "float_model")
        outputs["float_model"] = "float_model"
    (out / "qat_plan.json").write_text(__import__("json").dumps({"mix": cfg.mix, "plan": plan, **coverage}, indent=1))
    return {"outputs": outputs,
            "metrics": {"mix": cfg.mix, "init": cfg.init, **init, "final": last, "float_twin_final": twin_last,
                        "scales": cfg.scales, "activations": cfg.activations, "learned_scale_tensors": len(coverage["learned_scales"]),
                        "fake_quantized": dict(Counter(coverage["fake_quantized"].values())),
                        "left_in_float": dict(Counter(coverage["float"].values()))}}


def gptq_init(model, plan: dict[str, str], calib, damp: float) -> dict:
    """Move the student's planned weights onto GPTQ's solution for the same exact grid
    (quant/gptq.py); QAT's quantizers then start from it. Returns what it did, for the metrics."""
    import time

    from edgekit.quant.ptq import gptq_gguf_blocks, load_blocks

    t0 = time.perf_counter()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    blocks = gptq_gguf_blocks(model, plan, calib, tied, damp)
    load_blocks(model, blocks)
    return {"gptq_init": {"tensors": len(blocks), "calibration_rows": int(calib.shape[0]), "damp": damp,
                          "seconds": round(time.perf_counter() - t0, 1)}}
