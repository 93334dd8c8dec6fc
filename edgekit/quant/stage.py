"""The `qat` stage: the distilled student, fake-quantized on llama.cpp's exact grid,
trained against the full-precision teacher with the distillation losses."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from edgekit.distill.stage import save_model
from edgekit.distill.trainer import KDSettings, train
from edgekit.pipeline import RunContext, stage
from edgekit.quant.qat import plan_types, prepare, strip


def student_source(ctx: RunContext) -> Path:
    return ctx.output("distill", "model") if "distill" in ctx.finished else ctx.teacher_path()


@stage("qat")
def run_qat(ctx: RunContext, cfg, out: Path) -> dict:
    src = student_source(ctx)
    plan = plan_types(src, cfg.mix)
    student = ctx.load_model(src)
    coverage = prepare(student, plan)
    rows, mask = ctx.rows_and_mask("train")
    settings = KDSettings.from_config(cfg)
    last = train(student, ctx.teacher(), rows, settings, out, desc="qat", mask=mask)
    strip(student)
    save_model(student, src, out / "model")
    outputs = {"model": "model", "plan": "qat_plan.json"}
    twin_last = None
    if "float" in cfg.baselines:
        del student
        twin = ctx.load_model(src)
        twin_last = train(twin, ctx.teacher(), rows, settings, out / "float_twin", desc="float twin (no QAT)", mask=mask)
        save_model(twin, src, out / "float_model")
        outputs["float_model"] = "float_model"
    (out / "qat_plan.json").write_text(__import__("json").dumps({"mix": cfg.mix, "plan": plan, **coverage}, indent=1))
    return {"outputs": outputs,
            "metrics": {"mix": cfg.mix, "final": last, "float_twin_final": twin_last,
                        "fake_quantized": dict(Counter(coverage["fake_quantized"].values())),
                        "left_in_float": dict(Counter(coverage["float"].values()))}}
