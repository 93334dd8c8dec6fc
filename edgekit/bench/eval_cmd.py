"""`edgekit eval FILE... [--data holdout.jsonl] [--tasks tasks.jsonl] [--reference MODEL] [--out DIR]`.

Quality of any GGUF (llama.cpp) or onnxruntime-genai folder (ONNX Runtime), each through
its own runtime: perplexity on held-out text, KL and top-1 agreement against a reference
(teacher or FP16 model: a .gguf, a model directory, embedded:NAME or a hub id; it must share
the vocabulary), and accuracy on a JSONL task set (edgekit.bench.tasks). Text is tokenized by
each file's own tokenizer, so a file needs nothing beside it. The reference is graded on the
same token ids, so every accuracy comes with its baseline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgekit.bench.quality import Scorer, evaluate, torch_scorer
from edgekit.bench.speed import model_size
from edgekit.data.documents import load_documents
from edgekit.data.tokens import pack
from edgekit.errors import EdgekitError

TASK_CTX = 512  # window for task items (prompt + answer), in tokens


class _PackTokenizer:
    """The subset of the HF tokenizer API `pack` uses, over a runtime's own tokenizer."""

    def __init__(self, encode: Callable[[str], list[int]], eos: int, bos: int | None = None):
        self.encode, self.eos_token_id, self.bos_token_id = encode, eos, bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        first = [self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []
        return {"input_ids": first + self.encode(text)}


@dataclass
class Opened:
    """A model file opened in its runtime: its tokenizer and a scorer."""

    path: Path
    backend: str
    n_vocab: int
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    stop_ids: set[int]
    scorer: Callable[[int], Scorer]  # window length -> scorer
    bos: int | None = None  # put first in every text (where the vocabulary asks for it)


def open_model(path: Path) -> Opened:
    if path.is_dir():
        return _open_onnx(path)
    if not path.is_file():
        raise EdgekitError(f"{path} does not exist", "pass a .gguf file or an onnxruntime-genai model folder")
    from edgekit.bench.llama_runner import bos_to_prepend, llama_scorer, load_llama

    llm = load_llama(path, n_ctx=16)
    return Opened(path, "llama.cpp", llm.n_vocab(),
                  encode=lambda text: llm.tokenize(text.encode(), add_bos=False, special=False),
                  decode=lambda ids: llm.detokenize(ids).decode("utf-8", errors="replace"),
                  stop_ids={llm.token_eos()}, scorer=lambda ctx: llama_scorer(path, ctx), bos=bos_to_prepend(llm))


def _open_onnx(folder: Path) -> Opened:
    from edgekit.bench.ort_runner import load_og, ort_scorer

    import onnxruntime_genai as og

    model = load_og(folder)
    tok = og.Tokenizer(model)
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    eos = config.get("eos_token_id", [])
    eos = set(eos if isinstance(eos, list) else [eos])
    return Opened(folder, "onnxruntime", config["vocab_size"],
                  encode=lambda text: [int(i) for i in tok.encode(text)],
                  decode=lambda ids: tok.decode(ids) if ids else "",
                  stop_ids=eos, scorer=lambda ctx: ort_scorer(folder, model))


def reference_scorer(spec: str, ctx: int, n_vocab: int) -> Scorer:
    from edgekit.models.loading import load_causal_lm
    from edgekit.models.sources import resolve_model

    if spec.endswith(".gguf") or Path(spec).is_dir() and (Path(spec) / "genai_config.json").is_file():
        ref = open_model(Path(spec))
        scorer, ref_vocab = ref.scorer(ctx), ref.n_vocab
    else:
        model = load_causal_lm(resolve_model(spec, Path.cwd()).path)
        scorer, ref_vocab = torch_scorer(model), model.config.vocab_size
    if ref_vocab != n_vocab:
        raise EdgekitError(f"the reference '{spec}' has a vocabulary of {ref_vocab} tokens, the file {n_vocab}; "
                           "KL, top-1 and task grading compare token by token",
                           "use a reference with the same tokenizer (the teacher or FP16 model)")
    return scorer


def run_eval(file: Path, data: str | None, reference: str | None, ctx: int, max_tokens: int,
             tasks: str | None = None) -> dict:
    """One file's figures: {"file", "backend", "size_mb", "ppl", ..., "tasks": {...}}."""
    from edgekit.bench.tasks import MAX_NEW_TOKENS, check_fits, grade, load_tasks

    if not data and not tasks:
        raise EdgekitError("nothing to evaluate", "pass --data (held-out text) and/or --tasks (a JSONL task set)")
    items = load_tasks(Path(tasks)) if tasks else None  # bad task files fail before any model loads
    m = open_model(Path(file))
    out = {"file": str(file), "backend": m.backend, "size_mb": model_size(Path(file)) / 2**20}
    window = max(ctx, TASK_CTX) if items else ctx
    scorers = {"file": m.scorer(window)}
    if reference:
        scorers["reference"] = reference_scorer(reference, window, m.n_vocab)
        out["reference"] = reference
    if data:
        subsets = data_subsets(data)
        for subset, spec in subsets.items():
            r = _text_quality(m, scorers, spec, ctx, max_tokens, bool(reference), f"eval {Path(file).name}" + (f" [{subset}]" if subset else ""))
            if subset is None:
                out.update({"data": data, **r})
            else:
                out["data"] = data
                out.setdefault("subsets", {})[subset] = {"data": spec, **r}
    if items:
        check_fits(items, m.encode, MAX_NEW_TOKENS, window, "raise --ctx to at least {longest}, or shorten the prompts")
        g = grade(items, scorers, m.encode, m.decode, m.stop_ids, MAX_NEW_TOKENS, desc=f"tasks {Path(file).name}", bos=m.bos)
        out["tasks"] = {"file": tasks, "chance": g["chance"], **{k: g[k] for k in scorers}}
    return out


def data_subsets(data: str) -> dict:
    """{subset name: file} for a folder of JSONL files (e.g. recipes/data/general: one subset per
    genre), or {None: data} for one file or hf: dataset."""
    path = Path.cwd() / data
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise EdgekitError(f"{path} holds no .jsonl files", "give a JSONL file, or a folder of them (one subset each)")
        return {f.stem: str(f) for f in files}
    return {None: data}


def _text_quality(m: Opened, scorers: dict, data: str, ctx: int, max_tokens: int, with_reference: bool, desc: str) -> dict:
    """Perplexity on `data` (and against the reference: KL statistics as llama-perplexity reports them)."""
    rows, _ = pack(load_documents(data, Path.cwd()), _PackTokenizer(m.encode, min(m.stop_ids, default=0), m.bos), ctx, "evaluation")
    rows = rows[: max(1, max_tokens // ctx)]
    r = evaluate(scorers, rows, [("file", "reference")] if with_reference else [], desc=desc)
    out = {"ctx": ctx, "tokens": r["file"]["tokens"], "ppl": r["file"]["ppl"]}
    if with_reference:
        pair = r["file|reference"]
        out.update({"reference_ppl": r["reference"]["ppl"], "kl_vs_reference": pair["kl"], "top1_vs_reference": pair["top1"],
                    **{k: pair[k] for k in ("kld_median", "kld_p99", "kld_p999", "kld_max", "ppl_ratio")}})
    return out


def markdown(results: list[dict]) -> str:
    """A table of `run_eval` results: one row per file and text subset."""
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| file | text | backend | size MB | ppl | KL mean | KL p99 | KL p99.9 | same top | task acc | task acc (reference) "
             "| exact match |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r.get("tasks") or {}
        f, ref = t.get("file") or {}, t.get("reference") or {}
        texts = [("", r)] + list((r.get("subsets") or {}).items())
        for name, q in texts:
            if name == "" and "ppl" not in q and len(texts) > 1:
                continue
            lines.append(f"| {Path(r['file']).name} | {name or '-'} | {r['backend']} | {r['size_mb']:.1f} | {fmt(q.get('ppl'), '.3f')} | "
                         f"{fmt(q.get('kl_vs_reference'), '.4f')} | {fmt(q.get('kld_p99'), '.4f')} | {fmt(q.get('kld_p999'), '.4f')} | "
                         f"{fmt(q.get('top1_vs_reference'), '.1%')} | {fmt(f.get('acc'), '.1%')} | {fmt(ref.get('acc'), '.1%')} | "
                         f"{fmt(f.get('exact_match'), '.1%')} |")
    chance = next((r["tasks"]["chance"] for r in results if r.get("tasks") and r["tasks"]["chance"] is not None), None)
    if chance is not None:
        lines.append(f"\nMultiple-choice chance level: {chance:.1%}.")
    return "\n".join(lines) + "\n"


def write_outputs(results: list[dict], out: Path) -> list[Path]:
    """eval.json, eval.md and a quality-against-size plot in `out`."""
    from edgekit.fsutil import write_json, write_text
    from edgekit.report.plots import quality_vs_size

    write_json(out / "eval.json", results)
    write_text(out / "eval.md", markdown(results))
    written = [out / "eval.json", out / "eval.md"]
    key, label = (("kl_vs_reference", "KL(reference || model), nats/token") if all("kl_vs_reference" in r for r in results)
                  else ("ppl", "perplexity (held-out text)"))
    points = [(Path(r["file"]).name, r["size_mb"], r[key]) for r in results if r.get(key) is not None]
    if points:
        written.append(quality_vs_size(points, out / "quality_vs_size.png", ylabel=label))
    return written
