"""GGUF files on a target's own ARM kernels: llama.cpp cross-built for aarch64 at the target's
architecture level (third_party/build_llama_aarch64.sh), run here under qemu-user with a matching
CPU model. The kernels are exact (NEON, dotprod, i8mm, Q4_0 repacked for ARM: the same rounding
and accumulation order as on the device); the speed is not the device's and is not reported.

Parity is measured by llama.cpp's own `llama-perplexity --kl-divergence` on the ARM side, against
base files (`bench.kld`) written from the x86 llama.cpp run of the same file and, where given, from
the PyTorch model the file came from. The floor is x86 llama.cpp's own KL to that PyTorch model on
the same tokens: what the ARM kernels' KL to PyTorch should be read against.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgekit.bench import kld
from edgekit.errors import EdgekitError
from edgekit.progress import bar, status


def emulation_of(profile: dict) -> dict:
    emu = profile.get("emulate")
    if not emu:
        raise EdgekitError(f"target '{profile['name']}' has no ARM build to emulate",
                           "emulated targets: " + ", ".join(_emulated_names()))
    return emu


def _emulated_names() -> list[str]:
    from edgekit.bench.targets import PROFILES

    return [k for k, v in PROFILES.items() if v.get("emulate")]


def build_dir(march: str) -> Path:
    from edgekit.models.sources import cache_dir

    base = os.environ.get("EDGEKIT_LLAMA_AARCH64") or cache_dir() / f"llama-aarch64-{md.version('llama-cpp-python')}"
    return Path(base) / re.sub(r"[+.]", "_", march)


def emulator(profile: dict) -> list[str]:
    """The command prefix that runs the target's llama-perplexity: qemu-aarch64 -cpu MODEL BIN."""
    emu = emulation_of(profile)
    exe = build_dir(emu["march"]) / "bin" / "llama-perplexity"
    qemu = shutil.which("qemu-aarch64")
    if qemu is None or not exe.is_file():
        missing = "qemu-aarch64 (Debian's qemu-user)" if qemu is None else f"llama.cpp for {emu['march']}"
        raise EdgekitError(f"cannot emulate '{profile['name']}': {missing} is not installed",
                           f"run `bash third_party/build_llama_aarch64.sh {emu['march']}` once (~6 min; installs "
                           "g++-aarch64-linux-gnu and qemu-user with apt when root), then retry")
    return [qemu, "-cpu", emu["qemu_cpu"], str(exe)]


def run_kld(profile: dict, gguf: Path, base_file: Path, threads: int = 2) -> dict:
    """llama-perplexity --kl-divergence on the target's kernels against `base_file`."""
    n_ctx = kld.read_logits_file(base_file)[0].shape[1]
    cmd = emulator(profile) + ["-m", str(gguf), "--kl-divergence-base", str(base_file), "--kl-divergence",
                               "-c", str(n_ctx), "-b", str(n_ctx), "-ub", str(n_ctx), "-t", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise EdgekitError(f"llama-perplexity on '{profile['name']}' kernels failed on {gguf.name} (exit {out.returncode})",
                           "its output (last lines):\n" + (out.stdout + out.stderr)[-1500:])
    return kld.parse_llama_perplexity(out.stdout + out.stderr)


def emulated_parity(gguf: Path, profile: dict, text_ids: list[int], ctx: int, max_chunks: int = 8,
                    reference=None) -> dict:
    """One file on one target's ARM kernels: KL, top-1 and perplexity against the x86 llama.cpp
    run (and against `reference`, a PyTorch scorer of the model the file came from, with the floor).
    `text_ids`: the text in the file's own token ids."""
    import torch

    from edgekit.bench.llama_runner import bos_to_prepend, llama_scorer, load_llama

    tokens = kld.chunks(text_ids, ctx, max_chunks)
    llm = load_llama(gguf, n_ctx=ctx)
    bos, vocab = bos_to_prepend(llm), llm.n_vocab()
    del llm
    x86 = llama_scorer(gguf, ctx)

    def x86_logits(ids):
        return x86(torch.from_numpy(ids.astype(np.int64))).numpy()

    row = {"file": gguf.name, "target": profile["name"], "emulated": True, "kernels": profile["emulate"]["march"],
           "qemu_cpu": profile["emulate"]["qemu_cpu"], "ctx": ctx, "chunks": int(tokens.shape[0]),
           "note": "emulated: ARM kernels exact, speed not measured"}
    with tempfile.TemporaryDirectory(prefix="edgekit-emulate-") as tmp:
        base = Path(tmp) / "x86.kld"
        kld.write_logits_file(base, tokens, vocab, bos, x86_logits, bar(len(tokens), f"x86 logits {gguf.name}", unit="chunk"))
        with status(f"llama-perplexity on '{profile['name']}' kernels (qemu {profile['emulate']['qemu_cpu']}): {gguf.name}"):
            arm = run_kld(profile, gguf, base)
        row.update({"kl_vs_x86": arm["kld_mean"], "kl_vs_x86_max": arm["kld_max"], "top1_vs_x86": arm["same_top"],
                    "ppl": arm["ppl"], "ppl_x86": arm["ppl_base"], "tokens": int(tokens.shape[0]) * (ctx - 1 - ctx // 2)})
        if reference is not None:
            ref = Path(tmp) / "torch.kld"
            kld.write_logits_file(ref, tokens, vocab, bos, lambda ids: reference(torch.from_numpy(ids.astype(np.int64))).numpy(),
                                  bar(len(tokens), f"PyTorch logits {gguf.name}", unit="chunk"))
            with status(f"llama-perplexity on '{profile['name']}' kernels vs PyTorch: {gguf.name}"):
                vs_torch = run_kld(profile, gguf, ref)
            floor = kld.compare_to_file(ref, x86_logits, bos)
            row.update({"kl_vs_torch": vs_torch["kld_mean"], "top1_vs_torch": vs_torch["same_top"],
                        "floor_kl": floor["kld_mean"], "floor_top1": floor["same_top"], "ppl_torch": vs_torch["ppl_base"]})
    return row


def emulate_files(files: list[Path], targets: list[str], data: str, reference: str | None, ctx: int,
                  max_chunks: int) -> list[dict]:
    """`edgekit bench --emulate`: every GGUF on every emulated target among `targets`, on the
    text in `data` (tokenized by each file's own tokenizer), against x86 llama.cpp and, with
    `reference` (a model directory, embedded:NAME or hub id with the same vocabulary), PyTorch."""
    from edgekit.bench.eval_cmd import open_model, reference_scorer
    from edgekit.bench.targets import target
    from edgekit.data.documents import load_documents

    profiles = [p for p in (target(t) for t in targets) if p.get("emulate")]
    if not profiles:
        raise EdgekitError("--emulate needs a target with an ARM build",
                           "add --target " + " or --target ".join(_emulated_names()))
    for prof in profiles:
        emulator(prof)
    ggufs = [f for f in files if f.suffix == ".gguf"]
    if not ggufs:
        raise EdgekitError("--emulate runs GGUF files (llama.cpp's ARM kernels); none was given",
                           "pass .gguf files; ONNX folders are not emulated")
    text = "\n\n".join(d.render() for d in load_documents(data, Path.cwd()))
    rows = []
    for path in ggufs:
        opened = open_model(path)
        ids = opened.encode(text)
        ref = reference_scorer(reference, ctx, opened.n_vocab) if reference else None
        rows += [emulated_parity(path, prof, ids, ctx, max_chunks, ref) for prof in profiles]
    return rows
