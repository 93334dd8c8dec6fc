"""llama.cpp (llama-cpp-python) as a scorer and a speed benchmark for GGUF files."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.formats.gguf_read import open_gguf
from edgekit.fsutil import quiet_stderr
from edgekit.machine import cpu_has_amx


def no_repack_args() -> list[str]:
    """Arguments that turn weight repacking off for llama.cpp's common-argument tools
    (llama-perplexity, llama-speculative) on AMX CPUs, where it dies (SIGILL / segfault)."""
    return ["--no-repack"] if cpu_has_amx() else []


@contextlib.contextmanager
def amx_off():
    """Load models with llama.cpp's extra weight buffers (AMX, CPU repacking) off on CPUs
    with AMX: llama-cpp-python 0.3.36's AMX matmul segfaults on first use on such machines
    (llama.cpp issue 20824; measured: a Q8_0 GGUF crashes in decode, the same file runs with
    them off). Llama() takes no option for it, so the model defaults it reads are adjusted
    for the duration of the load. Elsewhere nothing changes."""
    import llama_cpp.llama_cpp as api

    if not cpu_has_amx():
        yield
        return
    defaults = api.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    api.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        api.llama_model_default_params = defaults


def load_llama(path: Path, n_ctx: int, threads: int | None = None, logits_all: bool = False, draft_model=None):
    import llama_cpp

    open_gguf(path)  # clear errors for missing, non-GGUF or truncated files
    try:
        with quiet_stderr(), amx_off():
            return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), logits_all=logits_all,
                                   n_threads=threads or os.cpu_count(), verbose=False, draft_model=draft_model)
    except Exception as e:
        raise EdgekitError(f"llama.cpp could not load {path}: {e}", "check the file is a complete GGUF of an architecture llama.cpp supports") from None


def bos_to_prepend(llm) -> int | None:
    """The BOS id where the file's vocabulary asks for one at the start of a text (Gemma, Llama;
    not SmolLM2): llama-perplexity puts it first in every chunk it scores."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    return int(llama_cpp.llama_vocab_bos(vocab)) if llama_cpp.llama_vocab_get_add_bos(vocab) else None


def gguf_draft(path: Path, n_ctx: int, tokens: int = 4, threads: int | None = None):
    """A draft model for llama-cpp-python's speculative decoding (`Llama(draft_model=...)`): a second
    GGUF with the target's vocabulary proposes `tokens` greedy tokens after the target's text, which
    the target then checks in one batched pass. Greedy output is the target's own, token for token;
    only the speed depends on how often the draft guesses right. The draft keeps its KV cache across
    calls and re-evaluates only where its text and the target's part."""
    import llama_cpp.llama_speculative as spec

    llm = load_llama(path, n_ctx=n_ctx, threads=threads)

    class GGUFDraft(spec.LlamaDraftModel):
        def __init__(self):
            self.llm, self.tokens, self.proposed = llm, tokens, 0

        def __call__(self, input_ids, /, **kwargs):
            ids = [int(t) for t in input_ids]
            have = self.llm.input_ids[: self.llm.n_tokens].tolist()
            same = 0
            while same < min(len(have), len(ids) - 1) and have[same] == ids[same]:
                same += 1
            self.llm.n_tokens = same  # eval() drops the cache past this point
            self.llm.eval(ids[same:])
            out = []
            for _ in range(min(self.tokens, self.llm.n_ctx() - self.llm.n_tokens - 1)):
                out.append(_greedy_next(self.llm))
                self.llm.eval(out[-1:])
            self.proposed += len(out)
            return np.array(out, dtype=np.intc)

    return GGUFDraft()


def llama_scorer(path: Path, ctx: int, threads: int | None = None):
    """Scorer (T,) -> (T, V) logits from llama.cpp, for `quality.evaluate`."""
    import torch

    llm = load_llama(path, n_ctx=ctx, threads=threads, logits_all=True)

    def score(row):
        ids = row.tolist()
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))

    return score


def llama_speed(path: Path, prompt_tokens: int, gen_tokens: int, threads: int, repeats: int) -> dict:
    """Prefill and decode tokens/s (greedy), time to first token, load time.

    Prompt tokens are a fixed, deterministic sequence of ordinary vocabulary ids; decode
    feeds back the argmax. Medians over `repeats` runs after one warm-up run.
    """
    t0 = time.perf_counter()
    llm = load_llama(path, n_ctx=prompt_tokens + gen_tokens + 8, threads=threads)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    prompt = [1 + (7919 * i) % (n_vocab - 1) for i in range(prompt_tokens)]  # fixed, valid ids
    runs = []
    for _ in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = _greedy_next(llm)
        t_prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([tok])
            tok = _greedy_next(llm)
        t_decode = time.perf_counter() - t1
        runs.append((prompt_tokens / t_prefill, gen_tokens / t_decode, t_prefill * 1000))
    runs = np.array(runs[1:])  # drop the warm-up
    return {"prefill_tps": float(np.median(runs[:, 0])), "decode_tps": float(np.median(runs[:, 1])),
            "decode_tps_min": float(runs[:, 1].min()), "decode_tps_max": float(runs[:, 1].max()),
            "ttft_ms": float(np.median(runs[:, 2])), "load_s": load_s, "threads": threads,
            "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats}


def _greedy_next(llm) -> int:
    """Argmax of the last evaluated position's logits, read straight from llama.cpp's
    buffer (llama-cpp-python only copies logits into `scores` when logits_all is on)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))


def llama_generate(path: Path, prompt: str, max_tokens: int, threads: int | None = None) -> str:
    llm = load_llama(path, n_ctx=512, threads=threads)
    return llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"]
