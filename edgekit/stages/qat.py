"""The `qat` stage: the distilled student, fake-quantized on llama.cpp's exact grid,
trained against the full-precision teacher with the distillation losses (QAT-KD), and its
float twin trained alike without fake quantization (the fair PTQ baseline)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from edgekit.formats import EXACT_MIXES
from edgekit.recipe.schema import Loss, Optimizer, SequenceKD, StageConfig, TrainSettings
from edgekit.stages.context import RunContext
from edgekit.stages.outputs import DistillOutput, QATOutput
from edgekit.stages.registry import StageResult, register


class QATConfig(StageConfig, TrainSettings):
    """QAT-KD: train the fake-quantized student (llama.cpp's exact grid) against the teacher.
    The training settings are distill's, with QAT's own defaults."""
    type: Literal["qat"]
    mix: Literal[EXACT_MIXES] = "q4_k_m"  # the llama.cpp mix the export will write (formats.EXACT_MIXES)
    loss: Loss = "forward_kl"
    steps: int = Field(20, ge=1)
    lr: float = Field(5e-5, gt=0.0)  # small: the weights only need to settle onto the grid
    warmup_steps: int = Field(2, ge=0)
    seed: int = 1
    # fp32 by default: under bf16 autocast (or bf16_matmul) the matmuls would round the grid's values (a
    # Q8_0 value needs 7 + 11 bits), so the forward would no longer be the deployed grid; bf16 and
    # bf16_matmul trade that for speed
    precision: Literal["auto", "fp32", "bf16", "bf16_matmul"] = "fp32"
    # recompute: each step, the format's own scale search; learn: Q8_0/Q5_0/Q4_0 block scales are
    # parameters (LSQ), trained at scale_lr (on log|scale|: ~that relative change per step); K-quants recompute
    scales: Literal["recompute", "learn"] = "recompute"
    scale_lr: float = Field(1e-3, gt=0.0)
    # recompute: run the K-quant (Q4_K/Q6_K) scale search every N-th step only, re-rounding the codes on
    # the last scales in between (the search is most of a step's time; the export always runs it in full)
    scale_refresh: int = Field(1, ge=1)
    # float: only the weights are fake-quantized; llama_cpp: each quantized layer's input is also
    # rounded to the 8-bit blocks llama.cpp's CPU matmuls use (quant.act_rounding; straight-through)
    activations: Literal["float", "llama_cpp"] = "float"
    # also train a float twin: the same start, data, steps and seed without fake quantization.
    # Its llama.cpp quantization is the PTQ baseline QAT is judged against, at equal training.
    baselines: list[Literal["float"]] = ["float"]
    optimizer: Optimizer = "adamw"
    # where the latent weights start: the student as it is ("float"), or GPTQ's solution on the
    # same exact grid ("gptq": error-compensated rounding from `calibration_rows` train rows), so
    # QAT-KD refines a good post-training quantization instead of plain rounding
    init: Literal["float", "gptq"] = "float"
    # also keep the latent model at these steps (snapshots/step-N: safetensors, exported like the final
    # one), e.g. for a quality-vs-training-tokens curve from one run
    snapshots: list[int] = []
    # data-free QAT (as LLM-QAT, Liu et al. 2023, trains on the model's own generations): train on the
    # teacher's answers to these prompts instead of data.train (generated once, filtered, cached)
    sequence_kd: SequenceKD | None = None
    calibration_rows: int = Field(32, ge=1)
    damp: float = Field(0.01, gt=0.0, le=1.0)
    # none: each tensor's scales searched as llama.cpp's plain quantization does; imatrix: as it does with
    # an importance matrix (`llama-quantize --imatrix`), measured on `calibration_rows` train rows of the
    # student before QAT: each value weighted by its input channel's mean square (Q4_K, Q6_K, Q5_0, Q4_0;
    # Q8_0 has no weighted search), so the training starts from llama.cpp's imatrix quantization
    importance: Literal["none", "imatrix"] = "none"

    def recipe_problems(self, recipe) -> list[str]:
        problems = []
        if self.parallel.student == "sharded" or self.parallel.teacher == "sharded":
            problems.append("qat.parallel: QAT trains replicated (FSDP of fake-quantized weights is not supported); "
                            "remove qat.parallel")
        exp = recipe.stage("export")
        late = [n for n in self.snapshots if not 1 <= n <= self.steps]
        if late:
            problems.append(f"qat.snapshots {late} are outside steps 1..{self.steps}; keep snapshot steps within qat.steps")
        if self.importance == "imatrix" and self.mix == "q4_1":
            problems.append("qat.importance: imatrix has no importance-weighted Q4_1 quantizer here; "
                            "use importance: none with mix q4_1, or mix q4_k_m / q4_0")
        if exp is not None and self.mix not in exp.formats:
            problems.append(f"qat.mix is '{self.mix}' but export.formats is {exp.formats}; export the format QAT trained for")
        return problems


@register("qat", QATConfig, produces=QATOutput, consumes=(DistillOutput,), trains=True)
def run(ctx: RunContext, cfg: QATConfig, out: Path) -> StageResult:
    from edgekit.data.tokens import spread
    from edgekit.distill.trainer import train
    from edgekit.models.loading import save_model
    from edgekit.quant.qat import learned_scales, plan_types, prepare, strip

    src = ctx.student_path()
    plan = plan_types(src, cfg.mix)
    student = ctx.load_model(src)
    rows, mask, data = training_rows(ctx, cfg, out)
    calib = spread(rows, cfg.calibration_rows)  # the importance matrix's and GPTQ's rows
    importance = column_importance(student, src, calib) if cfg.importance == "imatrix" else None
    init = gptq_init(student, plan, calib, cfg.damp) if cfg.init == "gptq" else {}
    coverage = prepare(student, plan, cfg.scales, scale_lr_ratio=cfg.scale_lr / cfg.lr, refresh=cfg.scale_refresh,
                       importance=importance)
    if cfg.activations == "llama_cpp":
        from edgekit.quant.act_rounding import llama_cpp_activations

        llama_cpp_activations(student, plan)  # forward hooks: not part of the saved weights
    holdout = ctx.rows("holdout")[: cfg.eval_rows] if cfg.eval_every else None
    keep = snapshot_saver(student, src, out / "snapshots", cfg.snapshots) if cfg.snapshots else None
    last = train(student, ctx.teacher(), rows, cfg, out, desc="qat", mask=mask, holdout=holdout, after_step=keep)
    scales = learned_scales(student)
    strip(student)
    save_model(student, src, out / "model")
    (out / "qat_plan.json").write_text(json.dumps({"mix": cfg.mix, "plan": plan, **coverage}, indent=1))
    outputs = QATOutput(model=out / "model", plan=out / "qat_plan.json")
    if scales:  # the learned block scales: the export packs them, evaluation rebuilds the grid from them
        from safetensors.torch import save_file

        save_file(scales, str(out / "qat_scales.safetensors"))
        outputs.scales = out / "qat_scales.safetensors"
    if importance:  # the export and evaluation search the final weights' scales with the same importance
        from safetensors.torch import save_file

        save_file(importance, str(out / "qat_importance.safetensors"))
        outputs.importance = out / "qat_importance.safetensors"
    twin_last = None
    if "float" in cfg.baselines:
        del student
        twin = ctx.load_model(src)
        twin_last = train(twin, ctx.teacher(), rows, cfg, out / "float_twin", desc="float twin (no QAT)", mask=mask,
                          holdout=holdout)
        save_model(twin, src, out / "float_model")
        outputs.float_model = out / "float_model"
    return StageResult(outputs, {
        "mix": cfg.mix, "init": cfg.init, **init, "importance": cfg.importance, "data": data, "final": last, "float_twin_final": twin_last,
        "scales": cfg.scales, "scale_refresh": cfg.scale_refresh, "activations": cfg.activations, "learned_scale_tensors": len(coverage["learned_scales"]),
        "fake_quantized": dict(Counter(coverage["fake_quantized"].values())),
        "left_in_float": dict(Counter(coverage["float"].values()))})


def training_rows(ctx: RunContext, cfg: QATConfig, out: Path):
    """(rows, mask, what they are): data.train's rows, or the teacher's filtered answers to
    `sequence_kd.prompts` (data-free QAT)."""
    if cfg.sequence_kd is None:
        return (*ctx.rows_and_mask("train"), {"source": "data.train"})
    from edgekit.data.tokens import pack

    docs, stats = ctx.teacher_answers(cfg.sequence_kd, out)
    rows, mask = pack(docs, ctx.tokenizer(), ctx.recipe.data.seq_len, "teacher generations")
    return rows, mask, {"source": "teacher generations", "rows": int(rows.shape[0]), **stats}


def snapshot_saver(student, tokenizer_dir: Path, folder: Path, steps: list[int]):
    """after_step for the trainer: the latent weights (and learned scales) at each of `steps`,
    as a model folder snapshots/step-N, written whole or not at all."""
    from safetensors.torch import save_file

    from edgekit.fsutil import atomic_path
    from edgekit.models.student import copy_tokenizer_files
    from edgekit.quant.qat import latent_state, learned_scales

    def keep(step: int) -> None:
        if step in steps and not (folder / f"step-{step}").is_dir():
            with atomic_path(folder / f"step-{step}") as tmp:
                student.save_pretrained(tmp, safe_serialization=True, state_dict=latent_state(student))
                copy_tokenizer_files(tokenizer_dir, tmp)
                if scales := learned_scales(student):
                    save_file(scales, str(tmp / "qat_scales.safetensors"))

    return keep


def column_importance(model, model_dir: Path, calib) -> dict:
    """{weight name: (in_features,) mean squared input} over `calib` rows: the importance matrix
    llama.cpp would be given (quant.imatrix), keyed by the transformers weights it weights."""
    import torch

    from edgekit.export.gguf_write import gguf_names
    from edgekit.quant.imatrix import collect

    by_gguf = {g: k for k, g in gguf_names(model_dir).items()}
    means = collect(model, model_dir, calib, "train").means()
    out = {by_gguf[g]: torch.from_numpy(v).contiguous() for g, v in means.items() if g in by_gguf}
    if getattr(model.config, "tie_word_embeddings", False):
        embed = next((k for k in out if k.endswith("embed_tokens.weight")), None)
        if embed:  # one tensor in the file: the output head's input weights it
            out["lm_head.weight"] = out[embed].clone()  # safetensors stores no shared memory
    return out


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
