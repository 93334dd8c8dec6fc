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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from edgekit import __version__
from edgekit.errors import EdgekitError
from edgekit.fsutil import read_json, replace, sha256_json, sha256_tree, write_json, write_text
from edgekit.recipe.schema import Recipe

StageFn = Callable[["RunContext", object, Path], dict]
STAGES: dict[str, StageFn] = {}  # type -> run function; configs live in recipe.schema.STAGE_CONFIGS


def stage(type_name: str):
    """Register a stage's run function: fn(ctx, cfg, out_dir) -> {"outputs": {..}, "metrics": {..}}."""
    def register(fn: StageFn) -> StageFn:
        STAGES[type_name] = fn
        return fn
    return register


def _load_stage_modules() -> None:
    # Imported here, not at the top, so `edgekit --help` never imports torch.
    import edgekit.bench.stages  # noqa: F401
    import edgekit.distill.stage  # noqa: F401
    import edgekit.export.stage  # noqa: F401
    import edgekit.quant.quantize_stage  # noqa: F401
    import edgekit.quant.stage  # noqa: F401
    import edgekit.report.stage  # noqa: F401


@dataclass
class RunContext:
    recipe: Recipe
    base: Path  # the recipe's directory: relative paths in the recipe start here
    run_dir: Path
    finished: dict = field(default_factory=dict)  # stage type -> artifact dict (with "dir")
    _cache: dict = field(default_factory=dict)

    # --- inputs shared by stages -------------------------------------------------
    def teacher_path(self) -> Path:
        if "teacher" not in self._cache:
            from edgekit.models.sources import resolve_model

            t = self.recipe.teacher
            self._cache["teacher"] = resolve_model(t.model, self.base, t.revision)
        return self._cache["teacher"].path

    def teacher_provenance(self) -> dict:
        self.teacher_path()
        return self._cache["teacher"].provenance

    def load_model(self, path: Path, trust_remote_code: bool = False, load: str | None = None):
        from edgekit.models.loading import load_causal_lm

        return load_causal_lm(path, self.recipe.teacher.dtype, trust_remote_code, load)

    def teacher(self):
        """The frozen teacher, in the recipe's `teacher.load` format (NF4/int8 through bitsandbytes)."""
        if "teacher_model" not in self._cache:
            t = self.recipe.teacher
            self._cache["teacher_model"] = self.load_model(self.teacher_path(), t.trust_remote_code, t.load)
        return self._cache["teacher_model"]

    def release_teacher(self) -> None:
        """Forget the loaded teacher: training sharded it over the processes (FSDP), so the
        stages after load it again whole."""
        self._cache.pop("teacher_model", None)

    def teacher_is_reference(self) -> bool:
        """Is the training teacher (`teacher()`) already the full-precision one?"""
        t = self.recipe.teacher
        return t.load in (None, "fp32") and t.dtype == "float32"

    def reference_teacher(self):
        """The teacher at full precision whatever `teacher.load` says: students are initialised
        from, and evaluated against, the real teacher, not its NF4/int8 copy."""
        t = self.recipe.teacher
        if self.teacher_is_reference():
            return self.teacher()
        from edgekit.models.loading import load_causal_lm

        return load_causal_lm(self.teacher_path(), "float32", t.trust_remote_code)

    def tokenizer(self):
        if "tokenizer" not in self._cache:
            from transformers import AutoTokenizer

            self._cache["tokenizer"] = AutoTokenizer.from_pretrained(
                self.teacher_path(), trust_remote_code=self.recipe.teacher.trust_remote_code)
        return self._cache["tokenizer"]

    def rows(self, split: str):
        """Packed token rows (N, seq_len) of data/<split>.jsonl."""
        return self.rows_and_mask(split)[0]

    def rows_and_mask(self, split: str):
        """Rows and their loss mask (N, seq_len) bool: False on chat context tokens."""
        key = f"rows:{split}"
        if key not in self._cache:
            from edgekit.data.documents import load_documents
            from edgekit.data.tokens import pack

            docs = load_documents(f"{split}.jsonl", self.run_dir / "data")
            self._cache[key] = pack(docs, self.tokenizer(), self.recipe.data.seq_len, split)
        return self._cache[key]

    def output(self, stage_type: str, name: str) -> Path:
        art = self.finished.get(stage_type)
        if art is None or name not in art["outputs"]:
            raise EdgekitError(f"no '{name}' output from a '{stage_type}' stage in this run", "add that stage to the recipe")
        return Path(art["dir"]) / art["outputs"][name]["path"]


def prepare_data(ctx: RunContext) -> dict:
    """Split the recipe's documents into data/train.jsonl and data/holdout.jsonl."""
    from edgekit.data.documents import load_documents, ngram_overlap, split_documents

    d = ctx.recipe.data
    docs = load_documents(d.train, ctx.base)
    if d.max_documents:
        docs = docs[: d.max_documents]
    if d.holdout:
        train, holdout = docs, load_documents(d.holdout, ctx.base)
    else:
        train, holdout = split_documents(docs, d.holdout_fraction, d.split_seed)
    out = ctx.run_dir / "data"
    for name, part in (("train", train), ("holdout", holdout)):
        lines = "".join(json.dumps({"text": x.text} if x.messages is None else
                                   {"messages": [{"role": r, "content": c} for r, c in x.messages]}) + "\n" for x in part)
        write_text(out / f"{name}.jsonl", lines)
    overlap = ngram_overlap([x.render() for x in train], [x.render() for x in holdout])
    if overlap > 0.01:
        print(f"warning: {overlap:.1%} of holdout 13-grams also occur in the training data; holdout metrics may be optimistic")
    return {"train_documents": len(train), "holdout_documents": len(holdout), "holdout_13gram_overlap": round(overlap, 4),
            "train_sha256": sha256_tree(out / "train.jsonl"), "holdout_sha256": sha256_tree(out / "holdout.jsonl")}


TRAINING_STAGES = ("distill", "qat")  # the stages every process of a torchrun job takes part in


def run_recipe(recipe: Recipe, base: Path, runs_dir: Path, force: bool = False, from_stage: str | None = None) -> Path:
    """Run (or resume) a recipe. Under torchrun, rank 0 does all of this; the other ranks
    follow it (`_follow`): they train with it and write nothing in the run directory."""
    from edgekit.distill.parallel import barrier, broadcast_object, world

    _load_stage_modules()
    rank, size = world()
    run_dir = (runs_dir / recipe.name).resolve()
    if rank > 0:
        return _follow(recipe, base, run_dir, rank, size)
    run_dir.mkdir(parents=True, exist_ok=True)
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
        art["dir"] = str(final)
        broadcast_object(art, size)
        publish(final, art.get("publish", {}), run_dir)
        ctx.finished[cfg.type] = art
        timeline.append({"stage": name, "wall_s": art["wall_s"], "cached": not rerun})
        write_manifest(ctx, inputs, timeline)
    remove_stale_stages(run_dir, {f"{i:02d}-{c.type}" for i, c in enumerate(recipe.stages, 1)})
    return run_dir


def _follow(recipe: Recipe, base: Path, run_dir: Path, rank: int, size: int) -> Path:
    """Rank > 0 of a torchrun job: wait for rank 0's data, then run each training stage that
    rank 0 runs (same inputs, so the same model; gradients are averaged in the trainer) with
    a scratch output directory, and take rank 0's finished artifacts as its own."""
    from edgekit.distill.parallel import barrier, broadcast_object

    ctx = RunContext(recipe, base, run_dir)
    barrier(size)
    for i, cfg in enumerate(recipe.stages, 1):
        cached = broadcast_object(None, size)
        if not cached and cfg.type in TRAINING_STAGES:
            scratch = run_dir / ".ranks" / str(rank) / f"{i:02d}-{cfg.type}"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            STAGES[cfg.type](ctx, cfg, scratch)
        ctx.finished[cfg.type] = broadcast_object(None, size)
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
    result = STAGES[cfg.type](ctx, cfg, work)
    outputs = {k: {"path": p, "sha256": sha256_tree(work / p)} for k, p in result.get("outputs", {}).items()}
    art = {"stage": name, "type": cfg.type, "key": key, "config": cfg.model_dump(), "outputs": outputs,
           "metrics": result.get("metrics", {}), "publish": result.get("publish", {}), "wall_s": round(time.perf_counter() - t0, 1)}
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
    artifacts = {t: {k: v for k, v in a.items() if k != "dir"} for t, a in ctx.finished.items()}
    write_json(ctx.run_dir / "manifest.json", {
        "name": ctx.recipe.name, "edgekit": __version__, "inputs": inputs, "timeline": timeline,
        "artifacts": artifacts, "machine": machine_description()})


def machine_description() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}"
