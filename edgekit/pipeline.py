"""Run a recipe's stages in order, with a content-hash cache and resume.

    runs/<name>/
      recipe.lock.yaml         the recipe with every default filled in + package versions
      data/                    train.jsonl, holdout.jsonl (split by document)
      stages/NN-<type>/        each finished stage's outputs + artifact.json
      stages/NN-<type>.partial work in progress (checkpoints live here; resumed)
      export/                  the published model files
      manifest.json            provenance and every artifact's metrics
      report.md

A stage's key hashes its config, the previous stage's key and the run's inputs (teacher,
student spec, data). A stage whose finished directory holds an artifact.json with the
same key is skipped; otherwise it runs in `.partial` and is swapped in only when done,
so a finished artifact is never overwritten by a half-finished one.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
import yaml

from edgekit import __version__
from edgekit.errors import EdgekitError
from edgekit.fsutil import exclusive_lock, read_json, refuse_escaping_links, replace, sha256_json, sha256_tree, write_json, write_text
from edgekit.machine import machine_description
from edgekit.parallel import barrier, broadcast_object, world
from edgekit.recipe.schema import RecipeBase as Recipe
from edgekit.stages import REGISTRY, training_stages
from edgekit.stages.context import Artifact, RunContext
from edgekit.stages.outputs import to_json

def prepare_data(ctx: RunContext) -> dict:
    """Split the recipe's documents into data/train.jsonl and data/holdout.jsonl."""
    from edgekit.data.documents import load_documents, ngram_overlap, split_documents

    d = ctx.recipe.data
    docs = load_documents(d.train, ctx.base, d.weights)
    if d.max_documents:
        docs = docs[: d.max_documents]
    if d.holdout:
        train, holdout = docs, load_documents(d.holdout, ctx.base)
    else:
        train, holdout = split_documents(docs, d.holdout_fraction, d.split_seed)
    out = ctx.run_dir / "data"
    for name, part in (("train", train), ("holdout", holdout)):
        lines = "".join(json.dumps(({"text": x.text} if x.messages is None else
                                    {"messages": [{"role": r, "content": c} for r, c in x.messages]})
                                   | ({"weight": x.weight} if x.weight != 1 and name == "train" else {})) + "\n"
                        for x in part)
        write_text(out / f"{name}.jsonl", lines)
    overlap = ngram_overlap([x.render() for x in train], [x.render() for x in holdout])
    if overlap > 0.01:
        print(f"warning: {overlap:.1%} of holdout 13-grams also occur in the training data; holdout metrics may be optimistic")
    weighted = {"train_documents_weighted": sum(x.weight for x in train)} if any(x.weight != 1 for x in train) else {}
    return {"train_documents": len(train), **weighted, "holdout_documents": len(holdout),
            "holdout_13gram_overlap": round(overlap, 4),
            "train_sha256": sha256_tree(out / "train.jsonl"), "holdout_sha256": sha256_tree(out / "holdout.jsonl")}


def run_recipe(recipe: Recipe, base: Path, runs_dir: Path, force: bool = False, from_stage: str | None = None) -> Path:
    """Run (or resume) a recipe. Under torchrun, rank 0 does all of this; the other ranks
    follow it (`_follow`): they train with it and write nothing in the run directory."""
    rank, size = world()
    run_dir = (runs_dir / recipe.name).resolve()
    if rank > 0:
        return _follow(recipe, base, run_dir, rank, size)
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(run_dir, "run directory"):  # a second run of the same recipe is refused, not interleaved
        return _lead(recipe, base, run_dir, size, force, from_stage)


def _lead(recipe: Recipe, base: Path, run_dir: Path, size: int, force: bool, from_stage: str | None) -> Path:
    refuse_escaping_links(run_dir, f"the run directory {run_dir}")
    ctx = RunContext(recipe, base, run_dir)
    types = [s.type for s in recipe.stages]
    if from_stage and from_stage not in types:
        raise EdgekitError(f"--from '{from_stage}' is not a stage of this recipe", f"stages: {types}")
    write_text(run_dir / "recipe.lock.yaml", yaml.safe_dump(lock(recipe), sort_keys=False))
    data_info = prepare_data(ctx)
    inputs = {"teacher": ctx.teacher_provenance(), "student": recipe.student.model_dump(), "data": data_info,
              "seed": recipe.seed, "edgekit": __version__}
    barrier(size)  # followers read data/ and the converted teacher from here on
    key = sha256_json(inputs)
    rerun = force
    timeline = []
    for i, cfg in enumerate(recipe.stages, 1):
        rerun = rerun or (from_stage == cfg.type)
        key = sha256_json({"prev": key, "config": cfg.model_dump()})
        name = f"{i:02d}-{cfg.type}"
        final = run_dir / "stages" / name
        art_file = final / "artifact.json"
        cached = not rerun and art_file.is_file() and read_json(art_file).get("key") == key
        broadcast_object(cached, size)
        if cached:
            art = read_json(art_file)
            # an interrupted forced rerun (--from/--force) of a stage that is finished anyway
            shutil.rmtree(final.with_name(final.name + ".partial"), ignore_errors=True)
            print(f"[{name}] cached (key {key[:12]}), skipping", flush=True)
        else:
            rerun = True  # everything after a rerun stage reruns too
            art = _run_stage(ctx, cfg, name, key, final)
        broadcast_object(art, size)
        publish(final, art.get("publish", {}), run_dir)
        ctx.finished[cfg.type] = Artifact.from_record(art, final)
        timeline.append({"stage": name, "wall_s": art["wall_s"], "cached": not rerun})
        write_manifest(ctx, inputs, timeline)
    remove_stale_stages(run_dir, {f"{i:02d}-{c.type}" for i, c in enumerate(recipe.stages, 1)})
    return run_dir


def _follow(recipe: Recipe, base: Path, run_dir: Path, rank: int, size: int) -> Path:
    """Rank > 0 of a torchrun job: wait for rank 0's data, then run each training stage that
    rank 0 runs (same inputs, so the same model; gradients are averaged in the trainer) with
    a scratch output directory, and take rank 0's finished artifacts as its own."""
    ctx = RunContext(recipe, base, run_dir)
    barrier(size)
    for i, cfg in enumerate(recipe.stages, 1):
        cached = broadcast_object(None, size)
        if not cached and cfg.type in training_stages():
            scratch = run_dir / ".ranks" / str(rank) / f"{i:02d}-{cfg.type}"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            ctx.current = REGISTRY[cfg.type]
            ctx.current.run(ctx, cfg, scratch)
        final = run_dir / "stages" / f"{i:02d}-{cfg.type}"
        ctx.finished[cfg.type] = Artifact.from_record(broadcast_object(None, size), final)
    shutil.rmtree(run_dir / ".ranks" / str(rank), ignore_errors=True)
    return run_dir


def remove_stale_stages(run_dir: Path, current: set[str]) -> None:
    """Stage directories of an older version of this recipe (other numbering or types)."""
    for p in (run_dir / "stages").iterdir():
        if p.name.removesuffix(".partial") not in current:
            shutil.rmtree(p, ignore_errors=True)


def _run_stage(ctx: RunContext, cfg, name: str, key: str, final: Path) -> dict:
    work = final.with_name(final.name + ".partial")
    if work.is_dir() and (work / "key").is_file() and (work / "key").read_text() != key:
        shutil.rmtree(work)  # a partial run of a different config: its checkpoints do not apply
    work.mkdir(parents=True, exist_ok=True)
    (work / "key").write_text(key)
    print(f"[{name}] running", flush=True)
    t0 = time.perf_counter()
    ctx.current = stage = REGISTRY[cfg.type]
    result = stage.run(ctx, cfg, work)
    ctx.current = None
    if (result.outputs is None) != (stage.produces is None) or not isinstance(result.outputs, stage.produces or type(None)):
        raise TypeError(f"stage '{cfg.type}' returned {type(result.outputs).__name__}, not its declared outputs")
    outputs = to_json(result.outputs, work) if result.outputs is not None else {}
    art = {"stage": name, "type": cfg.type, "key": key, "config": cfg.model_dump(), "outputs": outputs,
           "metrics": result.metrics, "publish": result.publish, "wall_s": round(time.perf_counter() - t0, 1)}
    write_json(work / "artifact.json", art)  # last: the mark of a finished stage
    replace(work, final)
    print(f"[{name}] done in {art['wall_s']} s", flush=True)
    return art


def publish(stage_dir: Path, files: dict, run_dir: Path) -> None:
    """Hard-link (or copy) a finished stage's files to their place in the run directory."""
    import os

    from edgekit.fsutil import atomic_path, confine

    for src, dst in files.items():
        target = confine(run_dir, dst, "published file")
        source = stage_dir / src
        if target.is_file() and os.path.samefile(source, target):
            continue
        with atomic_path(target) as tmp:
            if source.is_dir():  # a model folder (ONNX): hard-link its files
                shutil.copytree(source, tmp, copy_function=_link_or_copy)
            else:
                _link_or_copy(source, tmp)


def _link_or_copy(src, dst) -> None:
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def lock(recipe: Recipe) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("edgekit", "torch", "transformers", "gguf", "llama-cpp-python", "safetensors", "onnxruntime"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"recipe": recipe.model_dump(mode="json"), "versions": versions, "python": platform.python_version()}


def write_manifest(ctx: RunContext, inputs: dict, timeline: list) -> None:
    artifacts = {t: a.record for t, a in ctx.finished.items()}
    write_json(ctx.run_dir / "manifest.json", {
        "name": ctx.recipe.name, "edgekit": __version__, "inputs": inputs, "timeline": timeline,
        "artifacts": artifacts, "machine": machine_description()})
