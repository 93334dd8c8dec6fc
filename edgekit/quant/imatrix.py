"""Importance matrices for llama.cpp's quantizer, computed in PyTorch on the recipe's data.

An importance matrix holds, for every weight matrix, the mean square of each input channel's
activation over calibration tokens (what llama.cpp's `llama-imatrix` measures). llama.cpp's
K-quant and Q4_0/Q5_0 quantizers then weight each column's rounding error by it (and by the
weight's own size), so the channels that carry large activations are kept more exactly.

We measure it with forward hooks on every nn.Linear (the output head too: in a tied model it
is the token embedding, as in llama-imatrix, which names it after the tensor the matmul reads),
hand it to llama.cpp's `llama_model_quantize` through its `imatrix` parameter (so the
quantization itself is llama.cpp's own), and write the same data as llama.cpp's imatrix GGUF
(`<name>.in_sum2` / `<name>.counts` per tensor, `imatrix.datasets`, `imatrix.chunk_count`,
`imatrix.chunk_size`), which `llama-quantize --imatrix FILE` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_path
from edgekit.progress import bar


class Imatrix:
    """Per GGUF tensor name: sum of squared input activations per channel, and tokens seen."""

    def __init__(self, sums: dict[str, np.ndarray], tokens: int, chunk_size: int, dataset: str):
        self.sums, self.tokens, self.chunk_size, self.dataset = sums, tokens, chunk_size, dataset

    def means(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer weights columns by: sum / count, float32."""
        return {k: (v / self.tokens).astype(np.float32) for k, v in self.sums.items()}

    def save(self, path: Path) -> Path:
        """llama.cpp's imatrix GGUF format (as llama-imatrix writes it), atomically."""
        import gguf

        with atomic_path(path) as tmp:
            w = gguf.GGUFWriter(str(tmp), arch="imatrix")  # llama-imatrix writes general.type, not an architecture
            w.add_type("imatrix")
            w.add_array("imatrix.datasets", [self.dataset])
            w.add_uint32("imatrix.chunk_count", max(1, self.tokens // max(1, self.chunk_size)))
            w.add_uint32("imatrix.chunk_size", self.chunk_size)
            for name in sorted(self.sums):
                w.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32))
                w.add_tensor(f"{name}.counts", np.array([self.tokens], dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        return path


def collect(model, model_dir: Path, rows: torch.Tensor, dataset: str) -> Imatrix:
    """Run `rows` (N, T) through `model` and gather every Linear's input squares, named as
    llama.cpp's converter names the tensors of `model_dir`."""
    from edgekit.export.gguf_write import gguf_names

    if rows.numel() == 0:
        raise EdgekitError("no calibration rows for the importance matrix", "give the recipe more training data")
    cfg = json.loads((model_dir / "config.json").read_text())
    names = gguf_names(model_dir)
    tied = cfg.get("tie_word_embeddings", False)
    embed = next((k for k, g in names.items() if g == "token_embd.weight"), None)
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        key = embed if (mod_name == "lm_head" and tied) else f"{mod_name}.weight"
        target = names.get(key)
        if target is None:
            continue  # no tensor of its own in the file (llama.cpp transforms it): nothing to weight

        def hook(_mod, args, target=target):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            acc = sums.setdefault(target, torch.zeros(x.shape[-1], dtype=torch.float64))
            acc += (x.double() ** 2).sum(0)

        hooks.append(mod.register_forward_pre_hook(hook))
    model.eval()
    progress = bar(rows.shape[0], "importance matrix", unit="row")
    try:
        with torch.no_grad():
            for row in rows:
                model(input_ids=row[None])
                progress.update(1)
    finally:
        progress.close()
        for h in hooks:
            h.remove()
    return Imatrix({k: v.numpy() for k, v in sums.items()}, int(rows.numel()), int(rows.shape[1]), dataset)
