"""The `distill` stage: initialise the student, train it against the frozen teacher
(token-level KD, optionally on the teacher's own answers, on-policy, with hidden states,
offline from a cached top-k, with LoRA), and the plain fine-tuning baseline beside it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from edgekit.errors import EdgekitError
from edgekit.recipe.schema import HiddenStateKD, LoraSpec, SequenceKD, StageConfig, TrainSettings
from edgekit.stages.context import RunContext
from edgekit.stages.outputs import DistillOutput
from edgekit.stages.registry import StageResult, register


class DistillConfig(StageConfig, TrainSettings):
    type: Literal["distill"]
    # also train the same student on the same rows and steps with labels alone (no teacher):
    # the plain fine-tuning baseline KD has to beat
    baselines: list[Literal["sft"]] = []
    sequence_kd: SequenceKD | None = None  # train on teacher-generated answers instead of data.train
    lora: LoraSpec | None = None  # train adapters instead of every weight; merged before export
    # online: the teacher runs every step. offline: its top-k next-token log-probs are computed once
    # per (teacher, rows, k, temperature), stored compressed in the cache and reused across runs and students
    teacher_logits: Literal["online", "offline"] = "online"
    top_k: int = Field(64, ge=1)  # offline: teacher tokens kept per position; the rest is one tail event
    hidden_states: HiddenStateKD | None = None

    @model_validator(mode="after")
    def _modes(self):
        if self.parallel.student == "sharded" and self.lora is not None:
            raise ValueError("parallel.student: sharded is for full-weight training; LoRA adapters are small enough "
                             "to replicate: use parallel.student: replicated with lora")
        if self.teacher_logits == "offline":
            offline_problem = self._offline_problem()
            if offline_problem:
                raise ValueError(offline_problem)
        return self

    def _offline_problem(self) -> str | None:
        if self.loss != "forward_kl":
            return (f"teacher_logits: offline keeps the teacher's top-k only, which defines forward KL; "
                    f"loss '{self.loss}' needs the full distribution: use loss: forward_kl or teacher_logits: online")
        if self.on_policy_fraction > 0:
            return ("teacher_logits: offline cannot grade sequences the student generates during training; "
                    "set on_policy_fraction: 0 or teacher_logits: online")
        if self.hidden_states is not None:
            return ("hidden_states needs the teacher's layer outputs every step, which the offline cache "
                    "does not keep: use teacher_logits: online with hidden_states")
        if self.sequence_kd is not None:
            return ("teacher_logits: offline caches the teacher on data.train rows; sequence_kd trains on "
                    "generated answers instead: use teacher_logits: online with sequence_kd")
        return None

    def recipe_problems(self, recipe) -> list[str]:
        if self.parallel.teacher == "sharded" and recipe.teacher.load in ("nf4", "int8"):
            return [f"distill.parallel.teacher is 'sharded' but teacher.load is '{recipe.teacher.load}': "
                    "FSDP shards plain tensors, not bitsandbytes' packed weights; shard an fp32/fp16 teacher "
                    "or replicate the quantized one"]
        return []


def adapters(student, cfg: DistillConfig):
    """(model to train, merge) with LoRA when the recipe asks for it, else the model itself."""
    if cfg.lora is None:
        return student, lambda: student
    from edgekit.distill.lean import with_lora

    return with_lora(student, cfg.lora)


def lean_ranks(cfg: DistillConfig, size: int) -> bool:
    """Under torchrun with both models sharded, do processes other than rank 0 skip loading
    them (parallel.skeleton)? Not when every process needs the whole teacher: offline logit
    caching (each process caches its rows) and sequence-level KD (generation)."""
    return (size > 1 and cfg.parallel.student == "sharded" and cfg.parallel.teacher == "sharded"
            and cfg.teacher_logits == "online" and cfg.sequence_kd is None)


def load_models(ctx: RunContext, cfg: DistillConfig):
    """(student, teacher, tokenizer dir, init info); with lean ranks, the other processes get
    meta-device skeletons that rank 0's values fill once sharded."""
    from edgekit.parallel import broadcast_object, skeleton, world

    rank, size = world()
    if not lean_ranks(cfg, size):
        student, tok_dir, info = ctx.initial_student(same_vocab=cfg.sequence_kd is None)
        return student, ctx.teacher(), tok_dir, info
    student, tok_dir, info = ctx.initial_student() if rank == 0 else (None, None, None)
    student = skeleton(student, size)
    tok_dir, info = broadcast_object((tok_dir, info), size)
    teacher = skeleton(ctx.teacher() if rank == 0 else None, size)
    return student, teacher, tok_dir, {**info, "other_processes_loaded": "skeletons (meta device), filled from rank 0's shards"}


def training_rows(ctx: RunContext, cfg: DistillConfig, out: Path, tok_dir: Path, teacher, info: dict):
    """(rows, mask, teacher): the recipe's train split, or the teacher's filtered answers
    (sequence-level KD; a student of another vocabulary then learns from labels alone)."""
    if cfg.sequence_kd is None:
        return (*ctx.rows_and_mask("train"), teacher)
    from transformers import AutoTokenizer

    from edgekit.data.tokens import pack

    docs, seq_stats = ctx.teacher_answers(cfg.sequence_kd, out)
    student_tok = AutoTokenizer.from_pretrained(tok_dir)
    rows, mask = pack(docs, student_tok, ctx.recipe.data.seq_len, "sequence-level KD")
    if student_tok.get_vocab() != ctx.tokenizer().get_vocab():
        teacher = None  # another vocabulary: learn the teacher's text, not its logits
    info["sequence_kd"] = seq_stats | {"token_level_kd_too": teacher is not None}
    return rows, mask, teacher


def offline_cache(ctx: RunContext, cfg: DistillConfig, teacher, rows, info: dict):
    """The teacher's top-k on these rows, from the cache (built on first use)."""
    from edgekit.distill.logit_cache import load_or_build

    t0 = time.perf_counter()
    cache = load_or_build(teacher, ctx.teacher_provenance(), rows, cfg.top_k, cfg.temperature)
    info["teacher_logits"] = {"mode": "offline", "top_k": cfg.top_k, "bytes_per_token": cache.bytes_per_token,
                              "full_fp32_bytes_per_token": 4 * teacher.config.vocab_size,
                              "cache_file": str(cache.path), "cache_mb": round(cache.path.stat().st_size / 2**20, 2),
                              "reused": not cache.built, "seconds": round(time.perf_counter() - t0, 1)}
    return cache


def hidden_alignment(cfg: DistillConfig, student, teacher, info: dict):
    if cfg.hidden_states is None:
        return None
    from edgekit.distill.hidden import HiddenAlign

    if teacher is None:
        raise EdgekitError("hidden_states: the teacher's layer outputs can only be matched position by position when "
                           "teacher and student share one tokenizer, and this student's differs",
                           "remove hidden_states, or use a student with the teacher's tokenizer")
    hidden = HiddenAlign.build(cfg.hidden_states, student, teacher, info.get("kept_layers"), cfg.seed)
    info["hidden_states"] = hidden.describe()
    return hidden


@register("distill", DistillConfig, produces=DistillOutput, trains=True)
def run(ctx: RunContext, cfg: DistillConfig, out: Path) -> StageResult:
    from edgekit.distill.lean import trainable_parameters
    from edgekit.distill.trainer import train
    from edgekit.models.loading import save_model
    from edgekit.parallel import holds_shards

    student, teacher, tok_dir, info = load_models(ctx, cfg)
    rows, mask, teacher = training_rows(ctx, cfg, out, tok_dir, teacher, info)
    settings = cfg if teacher is not None else cfg.model_copy(update={"alpha_ce": 1.0})
    student, merge = adapters(student, cfg)
    info["trainable_params"] = trainable_parameters(student)
    cache = None
    if cfg.teacher_logits == "offline":
        cache, teacher = offline_cache(ctx, cfg, teacher, rows, info), None
    hidden = hidden_alignment(cfg, student, teacher, info)
    holdout = ctx.rows("holdout")[: cfg.eval_rows] if cfg.eval_every else None
    last = train(student, teacher, rows, settings, out, desc="distill", mask=mask, teacher_cache=cache, hidden=hidden,
                 holdout=holdout)
    if holds_shards(teacher):
        del teacher
        ctx.release_teacher()
    student = merge()
    save_model(student, tok_dir, out / "model")
    outputs = DistillOutput(model=out / "model", metrics_log=out / "metrics.jsonl")
    extra = {}
    if "sft" in cfg.baselines:
        del student
        extra["sft_final"], student = sft_baseline(ctx, cfg, settings, rows, mask, holdout, tok_dir, out)
        outputs.sft_model = out / "sft_model"
    return StageResult(outputs, {
        "student_params": sum(p.numel() for p in student.parameters()), "train_rows": int(rows.shape[0]),
        "tokens_trained": cfg.steps * cfg.batch_size * cfg.grad_accum * (rows.shape[1] - 1),
        "final": last, **extra, **info})


def sft_baseline(ctx: RunContext, cfg: DistillConfig, settings, rows, mask, holdout, tok_dir: Path, out: Path):
    """The same student trained on the same rows and steps with labels alone: (its last
    metrics, the model), saved to out/sft_model."""
    from edgekit.distill.trainer import train
    from edgekit.models.loading import save_model
    from edgekit.parallel import skeleton, world

    rank, size = world()
    lean = lean_ranks(cfg, size)
    fresh = ctx.initial_student()[0] if rank == 0 or not lean else None
    baseline, merge = adapters(skeleton(fresh, size) if lean else fresh, cfg)
    sft = settings.model_copy(update={"alpha_ce": 1.0})
    last = train(baseline, None, rows, sft, out / "sft", desc="sft baseline", mask=mask, holdout=holdout)
    baseline = merge()
    save_model(baseline, tok_dir, out / "sft_model")
    return last, baseline
