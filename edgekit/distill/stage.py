"""The `distill` stage: initialise the student, train it against the frozen teacher."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from edgekit.distill.lean import trainable_parameters
from edgekit.distill.parallel import broadcast_object, holds_shards, skeleton, world
from edgekit.distill.trainer import KDSettings, train
from edgekit.errors import EdgekitError
from edgekit.fsutil import release_memory
from edgekit.pipeline import RunContext, stage


def build_student(ctx: RunContext, same_vocab: bool = True):
    """The untrained student the recipe describes (also the 'student before KD' baseline)."""
    from transformers import AutoTokenizer

    from edgekit.models.sources import resolve_model
    from edgekit.models.student import (block_importance, check_same_vocab, init_from_teacher_layers, layers_to_keep,
                                        mlp_channel_importance, most_important, narrow_mlps)

    s = ctx.recipe.student
    if s.init == "teacher_layers":
        teacher = ctx.reference_teacher()
        keep = layers_to_keep(teacher.config.num_hidden_layers, s.keep_every, s.keep_layers)
        info = {"init": "teacher_layers", "kept_layers": keep, "keep_by": s.keep_by}
        calib = ctx.rows_and_mask("train")[0][: s.importance_rows]  # for the importance measurements
        if s.keep_by == "importance":
            scores = block_importance(teacher, calib)
            keep = info["kept_layers"] = most_important(scores, len(keep))
            info["block_importance"] = [round(x, 5) for x in scores]
        student = init_from_teacher_layers(teacher, keep)
        if s.mlp_keep is not None:
            info["mlp"] = narrow_mlps(student, s.mlp_keep, mlp_channel_importance(student, calib))
        if not ctx.teacher_is_reference():  # a full-precision copy beside an NF4/int8 teacher: free it now
            del teacher
            release_memory()
        return student, ctx.teacher_path(), info
    src = resolve_model(s.model, ctx.base)
    tok = AutoTokenizer.from_pretrained(src.path, trust_remote_code=s.trust_remote_code)
    if same_vocab:
        check_same_vocab(ctx.tokenizer(), tok, ctx.recipe.teacher.model, s.model)
    return ctx.load_model(src.path, s.trust_remote_code), src.path, {"init": "model", "source": src.provenance}


def save_model(model, tokenizer_dir: Path, out: Path) -> None:
    """The model as safetensors + config + tokenizer. A model FSDP left sharded is gathered
    (every process calls this) and rank 0 writes it."""
    from edgekit.distill.parallel import gathered_weights
    from edgekit.models.student import copy_tokenizer_files

    weights = gathered_weights(model)
    if weights == {}:  # another rank's share of a sharded model: rank 0 writes the whole
        return
    model.save_pretrained(out, safe_serialization=True, state_dict=weights)
    copy_tokenizer_files(tokenizer_dir, out)


def sequence_kd_data(ctx: RunContext, cfg, out: Path) -> tuple[list, dict]:
    """Teacher answers to the recipe's prompts, filtered; cached in the stage directory."""
    import json

    from edgekit.data.documents import Document, load_documents
    from edgekit.data.generate import filter_answers, generate_answers, prompt_texts

    sk = cfg.sequence_kd
    path = out / "sequence_kd.jsonl"
    if not path.is_file():  # generation is the expensive part: a resumed stage reuses it
        prompts = prompt_texts(load_documents(sk.prompts, ctx.base))
        rows = generate_answers(ctx.teacher(), ctx.tokenizer(), prompts, sk.max_new_tokens, sk.temperature, sk.top_p,
                                sk.batch_size, sk.seed)
        kept, stats = filter_answers(rows, sk.min_chars, sk.max_chars, sk.drop_truncated, sk.near_duplicate, sk.verifier)
        if not kept:
            raise EdgekitError(f"sequence-level KD: every one of {len(rows)} teacher answers was filtered out ({stats['dropped']})",
                               "raise sequence_kd.max_new_tokens, set drop_truncated: false, or loosen the filters")
        stats["sampling"] = sk.model_dump(exclude={"prompts", "verifier"}) | {"verifier": sk.verifier}
        (out / "sequence_kd_stats.json").write_text(json.dumps(stats, indent=2))
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    docs = load_documents(path.name, out)
    return docs, json.loads((out / "sequence_kd_stats.json").read_text())


def adapters(student, cfg):
    """(model to train, merge) with LoRA when the recipe asks for it, else the model itself."""
    if cfg.lora is None:
        return student, lambda: student
    from edgekit.distill.lean import with_lora

    return with_lora(student, cfg.lora)


def lean_ranks(cfg, size: int) -> bool:
    """Under torchrun with both models sharded, do processes other than rank 0 skip loading
    them (parallel.skeleton)? Not when every process needs the whole teacher: offline logit
    caching (each process caches its rows) and sequence-level KD (generation)."""
    return (size > 1 and cfg.parallel.student == "sharded" and cfg.parallel.teacher == "sharded"
            and cfg.teacher_logits == "online" and cfg.sequence_kd is None)


@stage("distill")
def run_distill(ctx: RunContext, cfg, out: Path) -> dict:
    from edgekit.data.tokens import pack

    seq = cfg.sequence_kd is not None
    rank, size = world()
    if lean_ranks(cfg, size):  # the other processes hold no whole model: rank 0's values reach their shards
        student, tok_dir, init_info = build_student(ctx) if rank == 0 else (None, None, None)
        student = skeleton(student, size)
        tok_dir, init_info = broadcast_object((tok_dir, init_info), size)
        teacher = skeleton(ctx.teacher() if rank == 0 else None, size)
        init_info = {**init_info, "other_processes_loaded": "skeletons (meta device), filled from rank 0's shards"}
    else:
        student, tok_dir, init_info = build_student(ctx, same_vocab=not seq)
        teacher = ctx.teacher()
    if seq:
        from transformers import AutoTokenizer

        docs, seq_stats = sequence_kd_data(ctx, cfg, out)
        student_tok = AutoTokenizer.from_pretrained(tok_dir)
        rows, mask = pack(docs, student_tok, ctx.recipe.data.seq_len, "sequence-level KD")
        if student_tok.get_vocab() != ctx.tokenizer().get_vocab():
            teacher = None  # another vocabulary: learn the teacher's text, not its logits
        init_info["sequence_kd"] = seq_stats | {"token_level_kd_too": teacher is not None}
    else:
        rows, mask = ctx.rows_and_mask("train")
    settings = replace(KDSettings.from_config(cfg), shard_student=cfg.parallel.student == "sharded",
                       shard_teacher=cfg.parallel.teacher == "sharded")
    if teacher is None:
        settings = replace(settings, alpha_ce=1.0)
    student, merge = adapters(student, cfg)
    init_info["trainable_params"] = trainable_parameters(student)
    cache = None
    if cfg.teacher_logits == "offline":
        from edgekit.distill.logit_cache import load_or_build

        t0 = time.perf_counter()
        cache = load_or_build(teacher, ctx.teacher_provenance(), rows, cfg.top_k, cfg.temperature)
        vocab = teacher.config.vocab_size
        teacher = None
        init_info["teacher_logits"] = {"mode": "offline", "top_k": cfg.top_k, "bytes_per_token": cache.bytes_per_token,
                                       "full_fp32_bytes_per_token": 4 * vocab,
                                       "cache_file": str(cache.path), "cache_mb": round(cache.path.stat().st_size / 2**20, 2),
                                       "reused": not cache.built,
                                       "seconds": round(time.perf_counter() - t0, 1)}
    hidden = None
    if cfg.hidden_states is not None:
        from edgekit.distill.hidden import HiddenAlign

        if teacher is None:
            raise EdgekitError("hidden_states: the teacher's layer outputs can only be matched position by position when "
                               "teacher and student share one tokenizer, and this student's differs",
                               "remove hidden_states, or use a student with the teacher's tokenizer")
        hidden = HiddenAlign.build(cfg.hidden_states, student, teacher, init_info.get("kept_layers"), cfg.seed)
        init_info["hidden_states"] = hidden.describe()
    holdout = ctx.rows("holdout")[: cfg.eval_rows] if cfg.eval_every else None
    last = train(student, teacher, rows, settings, out, desc="distill", mask=mask, teacher_cache=cache, hidden=hidden,
                 holdout=holdout)
    if holds_shards(teacher):
        del teacher
        ctx.release_teacher()
    student = merge()
    save_model(student, tok_dir, out / "model")
    outputs = {"model": "model", "metrics_log": "metrics.jsonl"}
    extra = {}
    if "sft" in cfg.baselines:
        del student
        fresh = build_student(ctx)[0] if rank == 0 or not lean_ranks(cfg, size) else None
        baseline, merge = adapters(skeleton(fresh, size) if lean_ranks(cfg, size) else fresh, cfg)
        sft = replace(settings, alpha_ce=1.0)
        extra["sft_final"] = train(baseline, None, rows, sft, out / "sft", desc="sft baseline", mask=mask, holdout=holdout)
        baseline = merge()
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
