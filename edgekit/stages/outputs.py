"""Typed outputs: what one stage hands to the stages after it.

Each is a small dataclass of files (paths under the producing stage's directory) and a few
plain values. A stage returns one; artifact.json stores it (each file with its sha256);
a consumer declares the types it reads and gets them back with `ctx.get(QATOutput)`.
They live here, apart from the stage modules, so that no stage imports another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from edgekit.fsutil import sha256_tree


@dataclass
class DistillOutput:
    model: Path  # the distilled student (safetensors model directory)
    metrics_log: Path  # metrics.jsonl
    sft_model: Path | None = None  # the plain fine-tuning baseline, when asked for


@dataclass
class QATOutput:
    model: Path  # latent (float) weights; the grid is recomputed from them, or from `scales`
    plan: Path  # qat_plan.json: {"mix", "plan": {weight: GGML type}, coverage}
    scales: Path | None = None  # learned block scales (scales: learn), safetensors
    float_model: Path | None = None  # the float twin: same training without fake quantization
    importance: Path | None = None  # per-column importance the scale searches used (importance: imatrix)

    def plan_data(self) -> dict:
        return json.loads(self.plan.read_text())

    def learned_scales(self) -> dict | None:
        """{weight name: fp16 scales} when QAT learned them, else None."""
        return _tensors(self.scales)

    def importances(self) -> dict | None:
        """{weight name: (in_features,) importance} when QAT's grid was importance-weighted, else None."""
        return _tensors(self.importance)


def _tensors(path: Path | None) -> dict | None:
    if path is None:
        return None
    from safetensors.torch import load_file

    return load_file(path)


@dataclass
class QuantizeOutput:
    files: dict[str, Path] = field(default_factory=dict)  # gptq, awq, gptq_gguf_q4_k_m, ... -> checkpoint or GGUF


@dataclass
class ExportOutput:
    source: str  # "student" or "teacher": which model the files hold
    readme: Path
    gguf: dict[str, Path] = field(default_factory=dict)  # format -> file
    ptq_gguf: dict[str, Path] = field(default_factory=dict)  # after QAT: the float twin through llama.cpp
    onnx_int4: Path | None = None
    imatrix: Path | None = None


def to_json(outputs, stage_dir: Path) -> dict:
    """Files as {"path": relative to the stage directory, "sha256"}; other values as they are."""
    def entry(p: Path) -> dict:
        rel = p.relative_to(stage_dir) if p.is_absolute() else p
        return {"path": str(rel), "sha256": sha256_tree(stage_dir / rel)}

    data = {}
    for f in fields(outputs):
        v = getattr(outputs, f.name)
        if isinstance(v, Path):
            data[f.name] = entry(v)
        elif isinstance(v, dict):
            data[f.name] = {k: entry(p) for k, p in v.items()}
        elif v is not None:
            data[f.name] = v
    return data


def from_json(cls, data: dict, stage_dir: Path):
    def path(e: dict) -> Path:
        return stage_dir / e["path"]

    values = {}
    for f in fields(cls):
        v = data.get(f.name)
        if isinstance(v, dict) and "sha256" in v:
            values[f.name] = path(v)
        elif isinstance(v, dict):
            values[f.name] = {k: path(e) for k, e in v.items()}
        elif v is not None:
            values[f.name] = v
    return cls(**values)
