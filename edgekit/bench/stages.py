"""The `evaluate` and `bench` stages of a recipe."""

from __future__ import annotations

from pathlib import Path

from edgekit.bench.quality import evaluate, torch_scorer
from edgekit.bench.suite import bench_files
from edgekit.pipeline import RunContext, stage


def gguf_outputs(ctx: RunContext, prefix: str = "gguf_") -> dict[str, Path]:
    """{format: path} of the export stage's files (prefix "ptq_gguf_" for the PTQ baseline)."""
    art = ctx.finished["export"]
    return {k.removeprefix(prefix): Path(art["dir"]) / v["path"] for k, v in art["outputs"].items() if k.startswith(prefix)}


def quantize_outputs(ctx: RunContext) -> dict[str, Path]:
    """{artifact key: path} of the quantize stage (gptq, awq, gptq_gguf_q4_k_m, ...)."""
    art = ctx.finished.get("quantize")
    return {k: Path(art["dir"]) / v["path"] for k, v in art["outputs"].items()} if art else {}


def qat_model(ctx: RunContext):
    """The QAT student as it trained: what the fake quantizers make of the latent weights,
    computed once (the same forward as in training)."""
    import json

    from edgekit.quant.qat import prepare, strip

    from edgekit.quant.stage import saved_scales

    model = ctx.load_model(ctx.output("qat", "model"))
    learned = saved_scales(ctx)
    prepare(model, json.loads(ctx.output("qat", "plan").read_text())["plan"], "learn" if learned else "recompute", learned)
    return strip(model, on_grid=True)


FLOOR = ("student_qat_llama_act", "student_qat_llama_act_fp64")


def parity_floor_scorers(ctx: RunContext, student_qat) -> dict:
    """Copies of the QAT student on its grid with llama.cpp's 8-bit activation rounding
    (`quant.act_rounding`), one in fp32 and one in fp64. Their disagreement is the parity
    floor: what two exact implementations of llama.cpp's arithmetic, differing only in float
    rounding, already disagree by; a file cannot be expected to match PyTorch more closely."""
    import copy
    import json

    import torch

    from edgekit.quant.act_rounding import llama_cpp_activations

    plan = json.loads(ctx.output("qat", "plan").read_text())["plan"]
    return {FLOOR[0]: torch_scorer(llama_cpp_activations(copy.deepcopy(student_qat), plan)),
            FLOOR[1]: torch_scorer(llama_cpp_activations(copy.deepcopy(student_qat), plan).to(torch.float64))}


@stage("evaluate")
def run_evaluate(ctx: RunContext, cfg, out: Path) -> dict:
    """Every model on the same holdout rows: teacher, student before and after KD (PyTorch),
    and each exported file through llama.cpp. KL/top-1 against the teacher, and parity of
    each file against the PyTorch model it was exported from."""
    from edgekit.bench.llama_runner import llama_scorer
    from edgekit.distill.stage import build_student

    rows = ctx.rows("holdout")
    rows = rows[: max(1, cfg.max_tokens // rows.shape[1])]
    if rows.shape[1] > cfg.ctx:
        rows = rows[:, : cfg.ctx]
    scorers = {"teacher": torch_scorer(ctx.reference_teacher())}
    if ctx.recipe.teacher.load not in (None, "fp32"):  # what the students were trained against
        scorers[f"teacher_{ctx.recipe.teacher.load}"] = torch_scorer(ctx.teacher())
    exported_from = ctx.finished["export"]["config"]["model"]  # "student" or "teacher"
    if "distill" in ctx.finished:
        if "student_init" in cfg.baselines:
            scorers["student_init"] = torch_scorer(build_student(ctx)[0])
        scorers["student"] = torch_scorer(ctx.load_model(ctx.output("distill", "model")))  # after KD, before QAT
        if "sft_model" in ctx.finished["distill"]["outputs"]:
            scorers["student_sft"] = torch_scorer(ctx.load_model(ctx.output("distill", "sft_model")))
    if "qat" in ctx.finished:
        student_qat = qat_model(ctx)
        scorers["student_qat"] = torch_scorer(student_qat)
        if cfg.parity_floor and gguf_outputs(ctx):
            scorers.update(parity_floor_scorers(ctx, student_qat))
    onnx = ctx.finished["export"]["outputs"].get("onnx_int4")
    if onnx:
        from edgekit.bench.ort_runner import ort_scorer

        scorers["onnx_int4"] = ort_scorer(Path(ctx.finished["export"]["dir"]) / onnx["path"])
    for prefix in ("ptq_gguf_", "gguf_"):
        for fmt, path in gguf_outputs(ctx, prefix).items():
            scorers[f"{prefix}{fmt}"] = llama_scorer(path, ctx=rows.shape[1])
    for key, path in quantize_outputs(ctx).items():  # GPTQ / AWQ: checkpoints in transformers, GGUFs in llama.cpp
        scorers[key] = llama_scorer(path, ctx=rows.shape[1]) if path.suffix == ".gguf" else torch_scorer(ctx.load_model(path))
    pairs = [(name, "teacher") for name in scorers if name not in ("teacher", *FLOOR)]
    if exported_from != "teacher":
        # parity: each file against the PyTorch model it came from
        if onnx:
            pairs.append(("onnx_int4", "student_qat" if "qat" in ctx.finished else "student"))
        for fmt in gguf_outputs(ctx):
            if "qat" in ctx.finished and fmt not in ("f16", "f32"):
                pairs.append((f"gguf_{fmt}", "student_qat"))
                if FLOOR[0] in scorers:
                    pairs.append((f"gguf_{fmt}", FLOOR[0]))
            elif "qat" not in ctx.finished:
                pairs.append((f"gguf_{fmt}", "student"))
    if FLOOR[0] in scorers:
        pairs.append((FLOOR[1], FLOOR[0]))
    result = evaluate(scorers, rows, pairs, desc="evaluate")
    metrics = {"holdout_rows": int(rows.shape[0]), "exported_from": exported_from, **result}
    if cfg.tasks:
        metrics["tasks"] = grade_tasks(ctx, cfg, {k: v for k, v in scorers.items() if k not in FLOOR}, window=rows.shape[1])
    return {"outputs": {}, "metrics": metrics}


def grade_tasks(ctx: RunContext, cfg, scorers: dict, window: int) -> dict:
    """Every scorer on the recipe's task set, on the same token ids (the teacher's tokenizer)."""
    from edgekit.bench.tasks import check_fits, grade, load_tasks
    from edgekit.fsutil import sha256_file

    path = ctx.base / cfg.tasks
    items = load_tasks(path)
    tok = ctx.tokenizer()

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    check_fits(items, encode, cfg.task_max_new_tokens, window,
               "raise the evaluate stage's ctx (and data.seq_len) to at least {longest}, or shorten the prompts")
    g = grade(items, scorers, encode, lambda ids: tok.decode(ids), {tok.eos_token_id}, cfg.task_max_new_tokens, desc="tasks")
    return {"file": cfg.tasks, "sha256": sha256_file(path), "chance": g.pop("chance"), "models": g}


@stage("bench")
def run_bench(ctx: RunContext, cfg, out: Path) -> dict:
    files = list(gguf_outputs(ctx).values())
    onnx = ctx.finished["export"]["outputs"].get("onnx_int4")
    if onnx:
        files.append(Path(ctx.finished["export"]["dir"]) / onnx["path"])
    rows = bench_files(files, cfg.targets, cfg.prompt_tokens, cfg.gen_tokens, cfg.repeats)
    return {"outputs": {}, "metrics": {"rows": rows}}
