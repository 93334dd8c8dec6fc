"""ONNX Runtime (onnxruntime-genai) as a scorer and a speed benchmark for int4 ONNX folders."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError


def load_og(folder: Path):
    import onnxruntime_genai as og

    folder = Path(folder)
    if not (folder / "genai_config.json").is_file() or not list(folder.glob("*.onnx")):
        raise EdgekitError(f"{folder} is not an onnxruntime-genai model folder (no genai_config.json / *.onnx)",
                           "pass a folder written by `edgekit run` (export format onnx_int4) or the genai model builder")
    try:
        return og.Model(str(folder))
    except Exception as e:
        raise EdgekitError(f"ONNX Runtime could not load {folder}: {str(e).splitlines()[0]}",
                           "re-export the folder; check that model.onnx and its .data file are complete") from None


def _generator(model, max_length: int, window: int = 0):
    """A greedy generator; its KV cache is made at least the sliding window long (`window`, from
    `sliding_window`): ORT's attention refuses a shorter one (Gemma 2/3 scoring a short row)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(max_length, window), do_sample=False)
    return og.Generator(model, params)


def sliding_window(folder: Path) -> int:
    """The sliding window the builder wrote into the folder's genai_config.json (0: none)."""
    config = json.loads((Path(folder) / "genai_config.json").read_text())
    return int((config["model"]["decoder"].get("sliding_window") or {}).get("window_size") or 0)


def ort_scorer(folder: Path, model=None):
    """Scorer (T,) -> (T, V) logits from ONNX Runtime, for `quality.evaluate` (`model`: the
    folder already loaded by `load_og`)."""
    import torch

    model = model or load_og(folder)
    window = sliding_window(folder)

    def score(row):
        g = _generator(model, len(row) + 1, window)
        g.append_tokens(row.tolist())
        return torch.from_numpy(np.array(g.get_output("logits"))[0].astype(np.float32))

    return score


def ort_speed(folder: Path, prompt_tokens: int, gen_tokens: int, threads: int, repeats: int) -> dict:
    """Prefill and greedy decode tokens/s through onnxruntime-genai (medians after a warm-up)."""
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    load_og(folder)  # clear errors for a folder that is not a model
    config = og.Config(str(folder))
    config.clear_providers()  # CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t0
    vocab = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["vocab_size"]
    prompt = [1 + (7919 * i) % (vocab - 1) for i in range(prompt_tokens)]  # fixed, valid ids
    window = sliding_window(folder)
    runs = []
    for _ in range(repeats + 1):
        g = _generator(model, prompt_tokens + gen_tokens + 1, window)
        t0 = time.perf_counter()
        g.append_tokens(prompt)
        t_prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(gen_tokens):
            g.generate_next_token()
        t_decode = time.perf_counter() - t1
        runs.append((prompt_tokens / t_prefill, gen_tokens / t_decode, t_prefill * 1000))
    r = np.array(runs[1:])
    return {"prefill_tps": float(np.median(r[:, 0])), "decode_tps": float(np.median(r[:, 1])),
            "decode_tps_min": float(r[:, 1].min()), "decode_tps_max": float(r[:, 1].max()),
            "ttft_ms": float(np.median(r[:, 2])), "load_s": load_s, "threads": threads,
            "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats}
