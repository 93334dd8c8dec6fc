"""The `evaluate` stage: every model on the same holdout rows (teacher, student before and
after KD and QAT in PyTorch, every exported file in its own runtime), KL and top-1 against
the teacher, parity of each file against the PyTorch model it came from, and task accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from edgekit.recipe.schema import StageConfig
from edgekit.stages.context import RunContext
from edgekit.stages.outputs import DistillOutput, ExportOutput, QATOutput, QuantizeOutput
from edgekit.stages.registry import StageResult, register

# the QAT student with llama.cpp's activation rounding, in fp32 and fp64: the parity floor
FLOOR = ("student_qat_llama_act", "student_qat_llama_act_fp64")


class EvaluateConfig(StageConfig):
    type: Literal["evaluate"]
    max_tokens: int = Field(4096, ge=16)  # holdout tokens scored per model
    ctx: int = Field(256, ge=16)  # window for perplexity, in tokens
    baselines: list[Literal["teacher", "student_init"]] = ["teacher", "student_init"]
    tasks: str | None = None  # JSONL task set (edgekit.bench.tasks), relative to the recipe; every model is graded on it
    task_max_new_tokens: int = Field(8, ge=1)  # greedy answer length for exact-match items
    parity_floor: bool = True  # with a qat stage: also score its model with llama.cpp's activation rounding in fp32 and fp64
    # a folder of JSONL files (e.g. data/general: narrative, expository, dialogue, code), relative to the
    # recipe: every model is also scored on each, against the teacher, beside the in-domain holdout
    general: str | None = None


def parity_floor_scorers(qat: QATOutput, student_qat) -> dict:
    """Copies of the QAT student on its grid with llama.cpp's 8-bit activation rounding
    (`quant.act_rounding`), one in fp32 and one in fp64. Their disagreement is the parity
    floor: what two exact implementations of llama.cpp's arithmetic, differing only in float
    rounding, already disagree by; a file cannot be expected to match PyTorch more closely."""
    import copy

    import torch

    from edgekit.bench.quality import torch_scorer
    from edgekit.quant.act_rounding import llama_cpp_activations

    plan = qat.plan_data()["plan"]
    return {FLOOR[0]: torch_scorer(llama_cpp_activations(copy.deepcopy(student_qat), plan)),
            FLOOR[1]: torch_scorer(llama_cpp_activations(copy.deepcopy(student_qat), plan).to(torch.float64))}


def pytorch_scorers(ctx: RunContext, cfg: EvaluateConfig, export: ExportOutput) -> dict:
    """The teacher and every PyTorch student of this run."""
    from edgekit.bench.quality import torch_scorer

    scorers = {"teacher": torch_scorer(ctx.reference_teacher())}
    if ctx.recipe.teacher.load not in (None, "fp32"):  # what the students were trained against
        scorers[f"teacher_{ctx.recipe.teacher.load}"] = torch_scorer(ctx.teacher())
    distill = ctx.get(DistillOutput)
    if distill is not None:
        if "student_init" in cfg.baselines:
            scorers["student_init"] = torch_scorer(ctx.initial_student()[0])
        scorers["student"] = torch_scorer(ctx.load_model(distill.model))  # after KD, before QAT
        if distill.sft_model is not None:
            scorers["student_sft"] = torch_scorer(ctx.load_model(distill.sft_model))
    qat = ctx.get(QATOutput)
    if qat is not None:
        student_qat = ctx.qat_student(qat)
        scorers["student_qat"] = torch_scorer(student_qat)
        if cfg.parity_floor and export.gguf:
            scorers.update(parity_floor_scorers(qat, student_qat))
    return scorers


def file_scorers(ctx: RunContext, export: ExportOutput, window: int) -> dict:
    """Every exported file (and PTQ artifact) in its own runtime."""
    from edgekit.bench.llama_runner import llama_scorer
    from edgekit.bench.quality import torch_scorer

    scorers = {}
    if export.onnx_int4 is not None:
        from edgekit.bench.ort_runner import ort_scorer

        scorers["onnx_int4"] = ort_scorer(export.onnx_int4)
    for prefix, files in (("ptq_gguf_", export.ptq_gguf), ("gguf_", export.gguf)):
        scorers |= {f"{prefix}{fmt}": llama_scorer(path, ctx=window) for fmt, path in files.items()}
    quantized = ctx.get(QuantizeOutput)
    for key, path in (quantized.files if quantized else {}).items():  # GPTQ / AWQ: checkpoints in transformers, GGUFs in llama.cpp
        scorers[key] = llama_scorer(path, ctx=window) if path.suffix == ".gguf" else torch_scorer(ctx.load_model(path))
    return scorers


def parity_pairs(export: ExportOutput, qat: bool, scorers: dict) -> list[tuple[str, str]]:
    """(file, PyTorch model it came from) pairs, plus the floor's own pair."""
    pairs = []
    if export.source != "teacher":
        if export.onnx_int4 is not None:
            pairs.append(("onnx_int4", "student_qat" if qat else "student"))
        for fmt in export.gguf:
            if qat and fmt not in ("f16", "f32"):
                pairs.append((f"gguf_{fmt}", "student_qat"))
                if FLOOR[0] in scorers:
                    pairs.append((f"gguf_{fmt}", FLOOR[0]))
            elif not qat:
                pairs.append((f"gguf_{fmt}", "student"))
    if FLOOR[0] in scorers:
        pairs.append((FLOOR[1], FLOOR[0]))
    return pairs


@register("evaluate", EvaluateConfig, consumes=(DistillOutput, QATOutput, QuantizeOutput, ExportOutput),
          requires=("export",))
def run(ctx: RunContext, cfg: EvaluateConfig, out: Path) -> StageResult:
    from edgekit.bench.quality import evaluate

    export = ctx.get(ExportOutput)
    rows = ctx.rows("holdout")
    rows = rows[: max(1, cfg.max_tokens // rows.shape[1])]
    if rows.shape[1] > cfg.ctx:
        rows = rows[:, : cfg.ctx]
    scorers = pytorch_scorers(ctx, cfg, export) | file_scorers(ctx, export, rows.shape[1])
    to_teacher = [(name, "teacher") for name in scorers if name not in ("teacher", *FLOOR)]
    parity = parity_pairs(export, ctx.get(QATOutput) is not None, scorers)
    result = evaluate(scorers, rows, to_teacher + parity, desc="evaluate")
    metrics = {"holdout_rows": int(rows.shape[0]), "exported_from": export.source, **result,
               "parity_pairs": [list(p) for p in parity], "floor": list(FLOOR) if FLOOR[0] in scorers else []}
    if cfg.general:
        metrics["general"] = general_quality(ctx, cfg, {k: v for k, v in scorers.items() if k not in FLOOR})
    if cfg.tasks:
        metrics["tasks"] = grade_tasks(ctx, cfg, {k: v for k, v in scorers.items() if k not in FLOOR}, window=rows.shape[1])
    return StageResult(None, metrics)


def general_quality(ctx: RunContext, cfg: EvaluateConfig, scorers: dict) -> dict:
    """Every model on each subset of the general set (text no recipe trains on), `max_tokens`
    tokens each in windows of `ctx`: perplexity and KL statistics against the teacher."""
    from edgekit.bench.eval_cmd import data_subsets
    from edgekit.bench.quality import evaluate
    from edgekit.data.documents import load_documents
    from edgekit.data.tokens import pack

    folder = ctx.base / cfg.general
    out = {}
    for name, file in data_subsets(str(folder)).items():
        rows, _ = pack(load_documents(file, ctx.base), ctx.tokenizer(), cfg.ctx, f"general/{name}")
        rows = rows[: max(1, cfg.max_tokens // cfg.ctx)]
        out[name or folder.stem] = evaluate(scorers, rows, [(k, "teacher") for k in scorers if k != "teacher"],
                                            desc=f"general [{name}]")
    return out


def grade_tasks(ctx: RunContext, cfg: EvaluateConfig, scorers: dict, window: int) -> dict:
    """Every scorer on the recipe's task set, on the same token ids (the teacher's tokenizer)."""
    from edgekit.bench.tasks import check_fits, grade, load_tasks
    from edgekit.data.tokens import row_start_bos
    from edgekit.fsutil import sha256_file

    path = ctx.base / cfg.tasks
    items = load_tasks(path)
    tok = ctx.tokenizer()

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    check_fits(items, encode, cfg.task_max_new_tokens, window,
               "raise the evaluate stage's ctx (and data.seq_len) to at least {longest}, or shorten the prompts")
    g = grade(items, scorers, encode, lambda ids: tok.decode(ids), {tok.eos_token_id}, cfg.task_max_new_tokens, desc="tasks",
              bos=row_start_bos(tok))
    return {"file": cfg.tasks, "sha256": sha256_file(path), "chance": g.pop("chance"), "models": g}
