"""Can this recipe's teacher go through every stage it asks for? Checked in seconds, before
any model loads (`edgekit validate`, and `edgekit run` before its first stage): the
architecture against llama.cpp's converter (GGUF formats, QAT, GPTQ on the GGUF grid) and
onnxruntime-genai's builder (onnx_int4), and a student of its own tokenizer against the
teacher's vocabulary. Nothing is downloaded: a hub model whose config is not cached is
reported as unchecked."""

from __future__ import annotations

from pathlib import Path

from edgekit.formats import ONNX_FORMATS


def support_problems(recipe, base: Path) -> tuple[list[str], list[str]]:
    """(problems, notes): each problem names the stage that would fail and why."""
    from edgekit.distill.memory import model_config

    t = recipe.teacher
    cfg = model_config(t.model, base, t.trust_remote_code, t.revision)
    if cfg is None:
        return [], [f"architecture not checked: the config of '{t.model}' is not in the local hub cache"]
    arch = architecture(cfg)
    problems, notes = _format_problems(recipe, arch, cfg)
    notes.append(f"teacher architecture {arch} (model_type {cfg.model_type})")
    problems += _vocabulary_problems(recipe, base) + _precision_problems(recipe, cfg.model_type)
    return problems, notes + _precision_notes(recipe)


FP16_OVERFLOWS = ("gemma2", "gemma3", "gemma3_text")  # residual activations beyond fp16's 65504


def _precision_problems(recipe, model_type: str) -> list[str]:
    """Gemma's residual stream overflows fp16: Gemma 3 270M loaded fp16 gave NaN logits on the
    first text it saw (benchmarks/lean_kd.py), which KD would only report as a NaN loss."""
    t = recipe.teacher
    if model_type in FP16_OVERFLOWS and t.weights == "fp16":
        return [f"teacher.load: fp16: {model_type} activations overflow float16 (Gemma 3 270M gives NaN logits); "
                "use load: bf16 (the same memory, float32's range), fp32, or nf4 / int8 (bitsandbytes computes in "
                "fp32) for less memory"]
    return []


def _precision_notes(recipe) -> list[str]:
    """A bf16 teacher on a CPU that emulates bf16: it runs, slowly (~25x fp32 on a 2-core AVX2 EPYC)."""
    import torch

    from edgekit.machine import cpu_has_bf16_matmul

    if recipe.teacher.weights == "bf16" and not torch.cuda.is_available() and not cpu_has_bf16_matmul():
        return ["teacher.load: bf16 on a CPU without native bf16 (AMX or AVX-512 BF16): the teacher's forward will be "
                "far slower than fp32; load: nf4 / int8 save more memory at fp32 compute speed"]
    return []


def architecture(cfg) -> str:
    """config.json's `architectures[0]`, or the causal-LM class transformers maps its model_type
    to (configs read from a GGUF carry no architectures)."""
    if getattr(cfg, "architectures", None):
        return cfg.architectures[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.model_type, type(cfg).__name__)


def _format_problems(recipe, arch: str, cfg) -> tuple[list[str], list[str]]:
    from edgekit.export.converter import CONVERTER, converter_path, supported_architectures

    problems, notes = [], []
    needs_gguf = [s.type for s in recipe.stages if s.type in ("qat", "quantize")
                  or (s.type == "export" and any(f not in ONNX_FORMATS for f in s.formats))]
    if needs_gguf:
        if not (converter_path() / CONVERTER).is_file():
            notes.append("GGUF support not checked: llama.cpp's converter is not fetched yet (make setup fetches it)")
        elif arch not in supported_architectures():
            problems.append(f"stages {needs_gguf}: llama.cpp's converter does not know architecture {arch} "
                            f"(model_type {cfg.model_type}), so no GGUF can be written; those stages would fail "
                            "(QAT and GPTQ read llama.cpp's per-tensor types from a converted file)")
    export = recipe.stage("export")
    if export is not None and "onnx_int4" in export.formats:
        from edgekit.export.onnx_export import builder_architectures, lm_head_clash

        known = builder_architectures()
        if known and arch not in known:
            problems.append(f"export.formats: onnx_int4: onnxruntime-genai's builder does not support {arch}; "
                            "the export stage would fail: remove onnx_int4")
        elif clash := lm_head_clash(cfg):  # a student copied from the teacher's layers has its widths
            problems.append(f"export.formats: {clash}; the export stage refuses it: remove onnx_int4")
    return problems, notes


def _vocabulary_problems(recipe, base: Path) -> list[str]:
    """A student of its own (init: model) must share the teacher's vocabulary for token-level KD."""
    s = recipe.student
    distill = recipe.stage("distill")
    if s.init != "model" or distill is None or distill.sequence_kd is not None:
        return []
    from transformers import AutoTokenizer

    from edgekit.errors import EdgekitError
    from edgekit.models.sources import classify, resolve_model
    from edgekit.models.student import check_same_vocab

    if "hub" in (classify(recipe.teacher.model, base), classify(s.model, base)):
        return []  # not downloaded by validate: checked when the run loads them
    try:
        toks = [AutoTokenizer.from_pretrained(resolve_model(m, base).path, trust_remote_code=trc)
                for m, trc in ((recipe.teacher.model, recipe.teacher.trust_remote_code), (s.model, s.trust_remote_code))]
        check_same_vocab(toks[0], toks[1], recipe.teacher.model, s.model)
    except EdgekitError as e:
        return [f"student.model: {e}"]
    return []
