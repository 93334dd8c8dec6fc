"""The `report` stage: runs/<name>/report.md and report.html from the run's artifacts, with
a greedy sample from every exported GGUF and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from edgekit.recipe.schema import StageConfig
from edgekit.stages.context import RunContext
from edgekit.stages.outputs import ExportOutput
from edgekit.stages.registry import REGISTRY, StageResult, register


class ReportConfig(StageConfig):
    type: Literal["report"]
    sample_prompt: str = "The capital of France is"
    sample_tokens: int = Field(24, ge=1)


def make_plots(ctx: RunContext, out: Path) -> list[Path]:
    from edgekit.report.plots import decode_speed, quality_vs_size

    (out / "plots").mkdir(exist_ok=True)
    plots = []
    fin = ctx.finished
    if "evaluate" in fin and "export" in fin:
        m, files = fin["evaluate"].metrics, fin["export"].metrics
        points = [(v["file"], v["size_mb"], m[f"{k}|teacher"]["kl"]) for k, v in files.items() if f"{k}|teacher" in m]
        if points:
            plots.append(quality_vs_size(points, out / "plots" / "quality_vs_size.png"))
    if "bench" in fin:
        rows = [r for r in fin["bench"].metrics["rows"] if not r.get("predicted")]
        if rows:
            plots.append(decode_speed(rows, out / "plots" / "decode_speed.png"))
    return plots


@register("report", ReportConfig, consumes=(ExportOutput,))
def run(ctx: RunContext, cfg: ReportConfig, out: Path) -> StageResult:
    from edgekit.bench.llama_runner import llama_generate
    from edgekit.machine import machine_description
    from edgekit.report.render import RunView, render, to_html

    export = ctx.get(ExportOutput)
    sample = {}
    if export is not None:
        sample = {"prompt": cfg.sample_prompt, "outputs": {
            p.name: llama_generate(p, cfg.sample_prompt, cfg.sample_tokens) for p in export.gguf.values()}}
    plots = make_plots(ctx, out)
    view = RunView(ctx.recipe, ctx.finished, machine_description(),
                   ctx.teacher_provenance().get("file", ctx.teacher_path().name), ctx.run_dir,
                   {name: s.config for name, s in REGISTRY.items()})
    text = render(view, sample)
    if plots:
        text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(to_html(ctx.recipe.name, text, out))
    publish = {"report.md": "report.md", "report.html": "report.html"} | {f"plots/{p.name}": f"plots/{p.name}" for p in plots}
    return StageResult(None, {"sample": sample}, publish)
