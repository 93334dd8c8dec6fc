"""The `bench` stage: speed and memory of every exported file in its runtime, on the
recipe's target profiles (measured here, or labelled predictions for devices)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from edgekit.recipe.schema import StageConfig
from edgekit.stages.context import RunContext
from edgekit.stages.outputs import DistillOutput, ExportOutput, QATOutput
from edgekit.stages.registry import StageResult, register


class BenchConfig(StageConfig):
    type: Literal["bench"]
    targets: list[str] = ["laptop"]  # profiles in edgekit/bench/targets.yaml
    prompt_tokens: int = Field(64, ge=1)
    gen_tokens: int = Field(32, ge=1)
    repeats: int = Field(3, ge=1)
    # run every GGUF on the ARM kernels of each target that has an `emulate` build (targets.yaml):
    # llama.cpp cross-built for aarch64 under qemu; parity vs x86 llama.cpp and PyTorch, perplexity
    emulate: bool = False
    # qemu runs ARM's NEON code ~50-100x slower than native here (an F16 file: minutes per 1,000 tokens)
    emulate_ctx: int = Field(128, ge=32)
    emulate_chunks: int = Field(4, ge=1)  # chunks of emulate_ctx holdout tokens; the second half of each is scored
    # F16/F32 files too: their ARM code runs far slower still under qemu (an F16 quickstart student did
    # not finish 512 tokens in 6 minutes), and it is the quantized types whose ARM kernels differ
    emulate_float: bool = False
    # the int4 ONNX folder too, in ONNX Runtime's own aarch64 build under qemu
    # (third_party/build_ort_aarch64.sh): parity vs ORT on x86 and vs the PyTorch model it holds
    emulate_onnx: bool = False

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v):
        from edgekit.bench.targets import PROFILES
        from edgekit.errors import did_you_mean

        for name in v:
            if name not in PROFILES:
                raise ValueError(f"unknown target '{name}'{did_you_mean(name, list(PROFILES))}; known: {', '.join(PROFILES)}")
        return v


    def recipe_problems(self, recipe) -> list[str]:
        from edgekit.bench.targets import PROFILES

        if self.emulate and not any(PROFILES[t].get("emulate") for t in self.targets):
            return ["bench: emulate is on but none of its targets has an ARM build: add "
                    + " or ".join(k for k, v in PROFILES.items() if v.get("emulate")) + " to targets"]
        return []


@register("bench", BenchConfig, consumes=(DistillOutput, QATOutput, ExportOutput), requires=("export",))
def run(ctx: RunContext, cfg: BenchConfig, out: Path) -> StageResult:
    from edgekit.bench.suite import bench_files

    export = ctx.get(ExportOutput)
    files = list(export.gguf.values()) + ([export.onnx_int4] if export.onnx_int4 is not None else [])
    metrics = {"rows": bench_files(files, cfg.targets, cfg.prompt_tokens, cfg.gen_tokens, cfg.repeats)}
    if cfg.emulate:
        metrics["emulated"] = emulated_rows(ctx, cfg, export)
    return StageResult(None, metrics)


def emulated_rows(ctx: RunContext, cfg: BenchConfig, export: ExportOutput, only: set[str] | None = None) -> list[dict]:
    """Every GGUF (and the PTQ baseline's; `only`: those labels) on each emulated target's ARM
    kernels, against x86 llama.cpp and the PyTorch model it holds, on the holdout; with
    `emulate_onnx`, the int4 ONNX folder in ONNX Runtime's aarch64 build against ORT on x86."""
    from edgekit.bench.emulate import (
        emulated_onnx_parity,
        emulated_parity,
        emulator,
        ort_emulator,
    )
    from edgekit.bench.quality import torch_scorer
    from edgekit.bench.targets import target

    profiles = [target(t) for t in cfg.targets if target(t).get("emulate")]
    onnx = export.onnx_int4 if cfg.emulate_onnx and (only is None or "onnx_int4" in only) else None
    for prof in profiles:  # not built: fail before anything runs, saying how to build it
        if only is None or only - {"onnx_int4"}:  # some GGUF is wanted
            emulator(prof)
        if onnx is not None:
            ort_emulator(prof)
    ids = ctx.rows("holdout").reshape(-1).tolist()
    rows = []
    if onnx is not None:  # the model the folder holds: the QAT model on its grid, else the float student
        qat = ctx.get(QATOutput)
        reference = torch_scorer(ctx.qat_student(qat) if qat is not None and export.source != "teacher"
                                 else _float_model(ctx, export))
        rows += [{"variant": "onnx_int4", **emulated_onnx_parity(onnx, prof, ids, cfg.emulate_ctx, cfg.emulate_chunks, reference)}
                 for prof in profiles]
        del reference
    for label, path, model in _files_and_models(ctx, export):
        if (label.removeprefix("ptq_") in ("f16", "f32") and not cfg.emulate_float) or (only and label not in only):
            continue
        reference = torch_scorer(model) if model is not None else None
        for prof in profiles:
            rows.append({"variant": label, **emulated_parity(path, prof, ids, cfg.emulate_ctx, cfg.emulate_chunks, reference)})
        del reference, model
    return rows


def _float_model(ctx: RunContext, export: ExportOutput):
    """The PyTorch model the run's float files hold."""
    qat = ctx.get(QATOutput)
    if export.source == "teacher":
        return ctx.reference_teacher()
    if qat is not None:
        return ctx.load_model(qat.model)  # the latent weights
    distill = ctx.get(DistillOutput)
    return ctx.load_model(distill.model if distill else ctx.student_path())


def _files_and_models(ctx: RunContext, export: ExportOutput):
    """(label, GGUF, the PyTorch model it holds) for every GGUF the run exported."""
    qat = ctx.get(QATOutput)
    source = _float_model(ctx, export)
    for fmt, path in export.gguf.items():
        on_grid = qat is not None and fmt not in ("f16", "f32")
        yield (f"qat_{fmt}" if on_grid else fmt), path, (ctx.qat_student(qat) if on_grid else source)
    for fmt, path in export.ptq_gguf.items():  # the float twin through llama.cpp's own quantizer: ARM vs x86 only
        yield f"ptq_{fmt}", path, None
