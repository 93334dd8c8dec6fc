"""The `distill` stage: initialise the student, train it against the frozen teacher."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edgekit.distill.trainer import KDSettings, train
from edgekit.pipeline import RunContext, stage


def build_student(ctx: RunContext):
    """The untrained student the recipe describes (also the 'student before KD' baseline)."""
    from transformers import AutoTokenizer

    from edgekit.models.sources import resolve_model
    from edgekit.models.student import check_same_vocab, init_from_teacher_layers, layers_to_keep

    s = ctx.recipe.student
    teacher = ctx.teacher()
    if s.init == "teacher_layers":
        keep = layers_to_keep(teacher.config.num_hidden_layers, s.keep_every, s.keep_layers)
        return init_from_teacher_layers(teacher, keep), ctx.teacher_path(), {"init": "teacher_layers", "kept_layers": keep}
    src = resolve_model(s.model, ctx.base)
    tok = AutoTokenizer.from_pretrained(src.path, trust_remote_code=s.trust_remote_code)
    check_same_vocab(ctx.tokenizer(), tok, ctx.recipe.teacher.model, s.model)
    return ctx.load_model(src.path, s.trust_remote_code), src.path, {"init": "model", "source": src.provenance}


def save_model(model, tokenizer_dir: Path, out: Path) -> None:
    from edgekit.models.student import copy_tokenizer_files

    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(tokenizer_dir, out)


@stage("distill")
def run_distill(ctx: RunContext, cfg, out: Path) -> dict:
    student, tok_dir, init_info = build_student(ctx)
    rows = ctx.rows("train")
    settings = KDSettings.from_config(cfg)
    last = train(student, ctx.teacher(), rows, settings, out, desc="distill")
    save_model(student, tok_dir, out / "model")
    outputs = {"model": "model", "metrics_log": "metrics.jsonl"}
    extra = {}
    if "sft" in cfg.baselines:
        del student
        baseline = build_student(ctx)[0]
        sft = replace(settings, alpha_ce=1.0)
        extra["sft_final"] = train(baseline, None, rows, sft, out / "sft", desc="sft baseline")
        save_model(baseline, tok_dir, out / "sft_model")
        outputs["sft_model"] = "sft_model"
        student = baseline
    n_params = sum(p.numel() for p in student.parameters())
    return {
        "outputs": outputs,
        "metrics": {"student_params": n_params, "train_rows": int(rows.shape[0]),
                    "tokens_trained": settings.steps * settings.batch_size * settings.grad_accum * (rows.shape[1] - 1),
                    "final": last, **extra, **init_info},
    }
