"""The stage registry: one row per stage type, filled by `@register` in each stage module.

    @register("qat", QATConfig, produces=QATOutput, consumes=(DistillOutput,), trains=True)
    def run(ctx, cfg, out) -> StageResult: ...

The registry's order (the order the modules register in, see stages/__init__.py) is the
order stages run in a recipe; the recipe schema's stage union, the pipeline, `validate`'s
memory estimate and the report's settings table are all read from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class StageResult:
    """What a stage's run function returns: its typed outputs (files under its directory),
    its measurements, and files to publish into the run directory ({stage file: run path})."""
    outputs: Any = None  # a dataclass from stages.outputs, or None
    metrics: dict = field(default_factory=dict)
    publish: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageType:
    name: str
    config: type  # its pydantic config (recipe.schema.StageConfig)
    run: Callable[..., StageResult]  # run(ctx, cfg, out_dir) -> StageResult
    produces: type | None  # its outputs' dataclass
    consumes: tuple[type, ...]  # output dataclasses of earlier stages it reads (when they ran)
    requires: tuple[str, ...]  # stage types that must come before it in a recipe
    trains: bool  # every process of a torchrun job takes part in it


REGISTRY: dict[str, StageType] = {}


def register(name: str, config: type, *, produces: type | None = None, consumes: tuple[type, ...] = (),
             requires: tuple[str, ...] = (), trains: bool = False):
    def add(fn: Callable[..., StageResult]) -> Callable[..., StageResult]:
        if name in REGISTRY:
            raise ValueError(f"stage type '{name}' is registered twice")
        REGISTRY[name] = StageType(name, config, fn, produces, consumes, requires, trains)
        return fn
    return add


def producer_of(output_type: type) -> StageType | None:
    return next((s for s in REGISTRY.values() if s.produces is output_type), None)
