"""`edgekit eval FILE.gguf --data holdout.jsonl [--reference MODEL]`: quality of any GGUF.

Text is tokenized by the GGUF's own tokenizer (llama.cpp), so any GGUF works without its
original tokenizer files. A reference (teacher or FP16 model: a .gguf, a model directory,
embedded:NAME or a hub id) must share the vocabulary; KL and top-1 are measured against it.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.bench.llama_runner import llama_scorer, load_llama
from edgekit.bench.quality import evaluate, torch_scorer
from edgekit.data.documents import load_documents
from edgekit.data.tokens import pack
from edgekit.errors import EdgekitError


class LlamaTokenizer:
    """The subset of the HF tokenizer API `pack` uses, backed by llama.cpp's tokenizer."""

    def __init__(self, llm):
        self.llm = llm
        self.eos_token_id = llm.token_eos()

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.llm.tokenize(text.encode(), add_bos=add_special_tokens, special=False)}


def reference_scorer(spec: str, ctx: int, n_vocab: int):
    from edgekit.models.loading import load_causal_lm
    from edgekit.models.sources import resolve_model

    if spec.endswith(".gguf"):
        ref = llama_scorer(Path(spec), ctx)
        ref_vocab = load_llama(Path(spec), n_ctx=16).n_vocab()
    else:
        model = load_causal_lm(resolve_model(spec, Path.cwd()).path)
        ref, ref_vocab = torch_scorer(model), model.config.vocab_size
    if ref_vocab != n_vocab:
        raise EdgekitError(f"the reference '{spec}' has a vocabulary of {ref_vocab} tokens, the file {n_vocab}; "
                           "KL and top-1 compare token by token", "use a reference with the same tokenizer (the teacher or FP16 model)")
    return ref


def run_eval(file: Path, data: str, reference: str | None, ctx: int, max_tokens: int) -> dict:
    llm = load_llama(file, n_ctx=16)
    tok = LlamaTokenizer(llm)
    rows, _ = pack(load_documents(data, Path.cwd()), tok, ctx, "evaluation")
    rows = rows[: max(1, max_tokens // ctx)]
    scorers = {"file": llama_scorer(file, ctx)}
    pairs = []
    if reference:
        scorers["reference"] = reference_scorer(reference, ctx, llm.n_vocab())
        pairs = [("file", "reference")]
    r = evaluate(scorers, rows, pairs, desc=f"eval {file.name}")
    out = {"file": str(file), "data": data, "ctx": ctx, "tokens": r["file"]["tokens"], "ppl": r["file"]["ppl"]}
    if reference:
        out.update({"reference": reference, "reference_ppl": r["reference"]["ppl"],
                    "kl_vs_reference": r["file|reference"]["kl"], "top1_vs_reference": r["file|reference"]["top1"]})
    return out
