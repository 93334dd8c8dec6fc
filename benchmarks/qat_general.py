"""QAT-KD on general text: every variant of each embedded model, through llama.cpp, on every subset
of the general evaluation set and on the recipe's own holdout, with llama-perplexity's KL statistics.

    .venv/bin/python benchmarks/qat_general.py [smollm2-135m] [gemma3-270m] [smollm2-135m-datafree]
        [--ptq-only | --qat-only] [--as=KEY] [key.path=value ...]

Per model it runs recipes/qat-<model>.yaml (QAT-KD on data/general_train.jsonl, GPTQ on the Q4_K_M
grid, export; finished stages are reused), then scores, against the F16 file of the untouched model
(the reference llama.cpp's KLD table uses):
  f16             the model itself (F16 GGUF)
  q4_k_m          llama.cpp's post-training Q4_K_M
  q4_k_m_imatrix  the same with an importance matrix measured on 32 rows of the general training text
  q5_k_m, q6_k    llama.cpp's larger mixes
  gptq_q4_k_m     GPTQ run on the Q4_K_M grid (the quantize stage)
  qat_q4_k_m      QAT-KD trained on the Q4_K_M grid, at Q4_K_M's size
each with perplexity, mean / p99 / p99.9 KLD, same-top-token share and file bytes; recovery =
(ppl PTQ - ppl QAT) / (ppl PTQ - ppl F16) per subset. The recovery-vs-training-tokens curve
("_curve") scores the QAT stage's snapshots (qat.snapshots: the latent weights at those steps of the
same run, so of one learning-rate schedule), each written on the Q4_K_M grid as the export writes
the final one. --ptq-only skips the training stages (the post-training variants only: llama.cpp's
mixes and GPTQ on the Q4_K_M grid); --qat-only scores F16,
Q4_K_M and the QAT files only (the baselines QAT is judged against), e.g. for the data-free recipe,
whose teacher-generated training text is also checked for 13-grams shared with the general set.
--as=KEY keeps a variant of one model's recipe (the key.path=value overrides) as results key KEY, run in
runs/<recipe>-KEY, beside the shipped recipe's results.
Results: benchmarks/results/qat_general.json.
"""

import json
import sys
import time
from pathlib import Path

from common import REPO, run_recipe, write_result

from edgekit.machine import machine_description

# results key -> recipe; the data-free variant (QAT on the teacher's own answers) scores beside the others
MODELS = {"smollm2-135m": "qat-smollm2", "gemma3-270m": "qat-gemma3", "smollm2-135m-datafree": "qat-smollm2-datafree"}
CTX, MAX_TOKENS = 256, 4096


def stage_file(run: Path, art: dict, stage: str, *keys: str) -> Path:
    entry = art[stage]["outputs"]
    for k in keys:
        entry = entry[k]
    return run / "stages" / art[stage]["stage"] / entry["path"]


def ptq_variants(f16: Path, out: Path, model_dir: Path, calib_rows, mixes=("q4_k_m", "q5_k_m", "q6_k"),
                 imatrix: bool = True) -> dict:
    """llama.cpp's own `mixes` of the F16 file, and (`imatrix`) Q4_K_M with an importance matrix measured
    on `calib_rows` of the general training text (edgekit.quant.imatrix, handed to llama.cpp)."""
    from edgekit.export.llama_quantize import quantize_gguf
    from edgekit.models.loading import load_causal_lm
    from edgekit.quant.imatrix import collect

    stem = f16.stem.removesuffix("-F16")
    files = {fmt: quantize_gguf(f16, out / f"{stem}-{fmt.upper()}.gguf", fmt) for fmt in mixes}
    if not imatrix:
        return files
    im = collect(load_causal_lm(model_dir), model_dir, calib_rows, "general_train.jsonl")
    files["q4_k_m_imatrix"] = quantize_gguf(f16, out / f"{stem}-Q4_K_M-imatrix.gguf", "q4_k_m", imatrix=im.means())
    return files


def score(files: dict, texts: dict) -> dict:
    """{subset: {variant: {ppl, kld_mean, kld_p99, kld_p999, same_top, bytes}}}, all vs f16."""
    from edgekit.bench.llama_runner import llama_scorer
    from edgekit.bench.quality import evaluate

    out = {}
    for subset, rows in texts.items():
        scorers = {k: llama_scorer(p, ctx=CTX) for k, p in files.items()}
        r = evaluate(scorers, rows, [(k, "f16") for k in files if k != "f16"], desc=f"qat_general [{subset}]")
        out[subset] = {k: {"ppl": r[k]["ppl"], "tokens": r[k]["tokens"], "bytes": files[k].stat().st_size,
                           **({"kld_mean": r[f"{k}|f16"]["kl"], "kld_median": r[f"{k}|f16"]["kld_median"],
                               "kld_p99": r[f"{k}|f16"]["kld_p99"], "kld_p999": r[f"{k}|f16"]["kld_p999"],
                               "kld_max": r[f"{k}|f16"]["kld_max"], "same_top": r[f"{k}|f16"]["top1"]} if k != "f16" else {})}
                       for k in files}
        del scorers
    return out


def snapshot_files(qat_stage: Path, out: Path) -> dict:
    """{"qat_stepN": Q4_K_M file} of each QAT snapshot, written on the trained grid as the export
    writes the final model (gguf_write with the stage's plan; learned scales packed when present)."""
    from safetensors.torch import load_file

    from edgekit.export.gguf_write import write_gguf
    from edgekit.quant.qat import learned_blocks

    plan = json.loads((qat_stage / "qat_plan.json").read_text())["plan"]
    importance = qat_stage / "qat_importance.safetensors"
    importance = load_file(str(importance)) if importance.is_file() else None
    files = {}
    for snap in sorted((qat_stage / "snapshots").glob("step-*"), key=lambda p: int(p.name.removeprefix("step-"))):
        path = out / f"qat-{snap.name}-Q4_K_M.gguf"
        if not path.is_file():
            scales = snap / "qat_scales.safetensors"
            scales = load_file(str(scales)) if scales.is_file() else None
            blocks = learned_blocks(snap, plan, scales, importance) if scales or importance else None
            write_gguf(snap, path, "q4_k_m", types=plan, blocks=blocks)
        files[f"qat_step{snap.name.removeprefix('step-')}"] = path
    return files


def gains(v: dict, r: dict) -> tuple[float | None, float]:
    """(recovery of the PTQ perplexity gap, mean KLD / Q4_K_M's) of variant scores `r` in subset scores `v`."""
    f, p = v["f16"]["ppl"], v["q4_k_m"]["ppl"]
    return (p - r["ppl"]) / (p - f) if p != f else None, r["kld_mean"] / v["q4_k_m"]["kld_mean"]


def teacher_dir(run: Path) -> Path:
    import yaml

    from edgekit.models.sources import resolve_model

    return resolve_model(yaml.safe_load((run / "recipe.lock.yaml").read_text())["recipe"]["teacher"]["model"], REPO).path


def texts_of(run: Path) -> dict:
    """Token rows (N, CTX) of every general subset and of the recipe's holdout, in the model's
    tokens; each row starts with BOS where the vocabulary asks for one (`pack` puts it there, as
    llama-perplexity feeds its chunks: Gemma 3 is far off without it)."""
    from transformers import AutoTokenizer

    from edgekit.data.documents import load_documents
    from edgekit.data.tokens import pack, spread

    tok = AutoTokenizer.from_pretrained(teacher_dir(run))

    def rows(docs, what, n):
        return pack(docs, tok, CTX, what)[0][:n]

    # the importance matrix's rows: spread over the whole train split (its head is one genre)
    texts = {"train_calibration": spread(pack(load_documents("train.jsonl", run / "data"), tok, CTX, "train")[0], 32)}
    for f in sorted((REPO / "recipes" / "data" / "general").glob("*.jsonl")):
        texts[f.stem] = rows(load_documents(str(f), REPO), f.stem, MAX_TOKENS // CTX)
    texts["in_domain"] = rows(load_documents("holdout.jsonl", run / "data"), "holdout", MAX_TOKENS // CTX)
    return texts


def generated_overlap(qat_stage: Path) -> dict | None:
    """{subset: share of its 13-grams in the teacher's generated training text} for data-free QAT."""
    from edgekit.data.contamination import grams_of, overlap, strings_of

    generated = qat_stage / "sequence_kd.jsonl"
    if not generated.is_file():
        return None
    grams = grams_of(strings_of(generated))
    return {f.stem: overlap(strings_of(f), grams) for f in sorted((REPO / "recipes" / "data" / "general").glob("*.jsonl"))}


def run_model(model: str, ptq_only: bool, overrides: list[str], qat_only: bool = False, run_name: str | None = None) -> dict:
    name = MODELS[model]
    run_name = run_name or (f"{name}-ptq" if ptq_only else name)
    t0 = time.time()
    if ptq_only:  # no training: GPTQ on the Q4_K_M grid and the F16 export, both of the untouched model
        art = run_recipe(f"{name}.yaml", run_name, "stages=[{type: quantize, model: teacher, methods: [gptq], gguf: [q4_k_m], "
                         "calibration_rows: 32}, {type: export, model: teacher, formats: [f16]}]", *overrides)
    else:
        art = run_recipe(f"{name}.yaml", run_name, *overrides)
    run = REPO / "runs" / run_name
    f16 = stage_file(run, art, "export", "ptq_gguf" if "qat" in art else "gguf", "f16")
    out = run / "qat_general"
    out.mkdir(exist_ok=True)
    texts = texts_of(run)
    calibration = texts.pop("train_calibration")
    baselines = {"mixes": ("q4_k_m",), "imatrix": False} if qat_only else {}
    files = {"f16": f16, **ptq_variants(f16, out, teacher_dir(run), calibration, **baselines)}
    if not qat_only:
        files["gptq_q4_k_m"] = next(stage_file(run, art, "quantize", "files", k) for k in art["quantize"]["outputs"]["files"]
                                    if k.endswith("q4_k_m"))
    if not ptq_only:
        files["qat_q4_k_m"] = stage_file(run, art, "export", "gguf", "q4_k_m")
        files |= snapshot_files(run / "stages" / art["qat"]["stage"], out)
    result = score(files, texts)
    curve = {}
    for subset, v in result.items():
        for key in [k for k in v if k.startswith("qat_step")]:
            r = v.pop(key)
            recovery, ratio = gains(v, r)
            curve.setdefault(key.removeprefix("qat_step"), {})[subset] = {
                "ppl": r["ppl"], "kld_mean": r["kld_mean"], "same_top": r["same_top"],
                "recovery": recovery, "kld_ratio_vs_q4_k_m": ratio}
    summary = {}
    if "qat_q4_k_m" in files:
        for subset, v in result.items():
            recovery, ratio = gains(v, v["qat_q4_k_m"])
            summary[subset] = {"recovery": recovery, "kld_ratio_qat_vs_q4_k_m": ratio}
    qat_s = art.get("qat", {}).get("wall_s")
    qat_cfg = art.get("qat", {}).get("config", {})
    tokens = qat_cfg.get("steps", 0) * qat_cfg.get("batch_size", 0) * qat_cfg.get("grad_accum", 1) * 256
    tokens_per_step = tokens // max(qat_cfg.get("steps", 1), 1)
    return {**result, "_summary": summary, "_qat": {"wall_s": qat_s, "train_tokens": tokens,
                                                    "s_per_million_tokens": qat_s / tokens * 1e6 if qat_s and tokens else None,
                                                    "config": {k: qat_cfg.get(k) for k in ("steps", "batch_size", "lr", "scale_refresh")}},
            "_curve": {"train_tokens_per_step": tokens_per_step, "steps": {n: curve[n] for n in sorted(curve, key=int)}},
            **({"_generated_text_13gram_overlap": generated_overlap(run / "stages" / art["qat"]["stage"])} if "qat" in art else {}),
            "_wall_s": time.time() - t0}


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(__doc__)
    flags = [a for a in sys.argv[1:] if a.startswith("-") and a.split("=")[0] not in ("--as", "--ptq-only", "--qat-only")]
    unknown = flags + [a for a in sys.argv[1:] if not a.startswith("-") and "=" not in a and a not in MODELS]
    if unknown:  # before anything runs: a mistyped flag must not start an hour of training
        sys.exit(f"unknown argument(s) {' '.join(unknown)}: models are {', '.join(MODELS)}; see --help")
    args = [a for a in sys.argv[1:] if not a.startswith("--") and "=" not in a] or list(MODELS)
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("--as=")]
    # --as=KEY: a variant of the recipe (its overrides) kept beside the shipped one, as results key
    # KEY in runs/<recipe>-KEY; one model only
    alias = next((a.removeprefix("--as=") for a in sys.argv[1:] if a.startswith("--as=")), None)
    if alias and len(args) != 1:
        sys.exit("--as=KEY names the variant of one model: give exactly one model")
    ptq_only, qat_only = "--ptq-only" in sys.argv, "--qat-only" in sys.argv
    sys.argv = sys.argv[:1]  # common.run_recipe passes sys.argv[1:] on to the recipe
    path = REPO / "benchmarks" / "results" / "qat_general.json"
    result = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    for model in args:
        key = alias or model
        result["models"][key] = run_model(model, ptq_only, overrides, qat_only, f"{MODELS[model]}-{alias}" if alias else None)
        if alias:
            result["models"][key]["_variant_of"] = {"model": model, "overrides": overrides}
    result["machine"] = machine_description()
    write_result("qat_general.json", result)
