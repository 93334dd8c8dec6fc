"""An onnxruntime-genai model folder's logits for chunks of token ids, through ONNX Runtime's plain
InferenceSession: one prefill per chunk with an empty KV cache, the positions llama-perplexity
scores (n_ctx/2 .. n_ctx-2) kept.

    python ort_logits.py FOLDER IDS.npy OUT.npy [THREADS]

Runs in any Python that has numpy and onnxruntime and nothing else of edgekit's, so the same code
runs in this machine's environment and in an aarch64 Python under qemu-user
(edgekit.bench.emulate): two runs differ only in the kernels ONNX Runtime picks for the CPU.
IDS.npy: (n_chunk, n_ctx) integer ids; OUT.npy: (n_chunk, n_ctx - 1 - n_ctx//2, vocab) float32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def session(folder: Path, threads: int):
    import onnxruntime as ort

    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(folder / config["filename"]), opts, providers=["CPUExecutionProvider"]), config


def chunk_logits(folder: Path, tokens: np.ndarray, threads: int = 2) -> np.ndarray:
    sess, config = session(Path(folder), threads)
    names = config["inputs"]
    feeds_kv = {}
    for inp in sess.get_inputs():  # the KV cache inputs, empty: (batch, kv heads, 0, head size)
        if inp.name.startswith(names["past_key_names"].split("%d")[0]) or inp.name.startswith(names["past_value_names"].split("%d")[0]):
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds_kv[inp.name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), dtype=dtype)
    n_ctx = tokens.shape[1]
    out = []
    for chunk in tokens:
        feeds = {names["input_ids"]: chunk[None].astype(np.int64),
                 names["attention_mask"]: np.ones((1, n_ctx), dtype=np.int64), **feeds_kv}
        logits = sess.run([config["outputs"]["logits"]], feeds)[0][0]
        out.append(logits[n_ctx // 2: n_ctx - 1].astype(np.float32))
    return np.stack(out)


def main(argv: list[str]) -> int:
    folder, ids, dest = Path(argv[0]), np.load(argv[1]), Path(argv[2])
    threads = int(argv[3]) if len(argv) > 3 else 2
    logits = chunk_logits(folder, ids, threads)
    tmp = dest.with_name(dest.name + ".partial.npy")
    np.save(tmp, logits)
    tmp.replace(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
