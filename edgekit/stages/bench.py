"""The `bench` stage: speed and memory of every exported file in its runtime, on the
recipe's target profiles (measured here, or labelled predictions for devices)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from edgekit.recipe.schema import StageConfig
from edgekit.stages.context import RunContext
from edgekit.stages.outputs import ExportOutput
from edgekit.stages.registry import StageResult, register


class BenchConfig(StageConfig):
    type: Literal["bench"]
    targets: list[str] = ["laptop"]  # profiles in edgekit/bench/targets.yaml
    prompt_tokens: int = Field(64, ge=1)
    gen_tokens: int = Field(32, ge=1)
    repeats: int = Field(3, ge=1)

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v):
        from edgekit.bench.targets import PROFILES
        from edgekit.errors import did_you_mean

        for name in v:
            if name not in PROFILES:
                raise ValueError(f"unknown target '{name}'{did_you_mean(name, list(PROFILES))}; known: {', '.join(PROFILES)}")
        return v


@register("bench", BenchConfig, consumes=(ExportOutput,), requires=("export",))
def run(ctx: RunContext, cfg: BenchConfig, out: Path) -> StageResult:
    from edgekit.bench.suite import bench_files

    export = ctx.get(ExportOutput)
    files = list(export.gguf.values()) + ([export.onnx_int4] if export.onnx_int4 is not None else [])
    return StageResult(None, {"rows": bench_files(files, cfg.targets, cfg.prompt_tokens, cfg.gen_tokens, cfg.repeats)})
