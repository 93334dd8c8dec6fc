"""GGUF files on a target's own ARM kernels: llama.cpp cross-built for aarch64 at the target's
architecture level (third_party/build_llama_aarch64.sh), run here under qemu-user with a matching
CPU model. The kernels are exact (NEON, dotprod, i8mm, Q4_0 repacked for ARM: the same rounding
and accumulation order as on the device); the speed is not the device's and is not reported.

Parity is measured by llama.cpp's own `llama-perplexity --kl-divergence` on the ARM side, against
base files (`bench.kld`) written from the x86 llama.cpp run of the same file and, where given, from
the PyTorch model the file came from. The floor is x86 llama.cpp's own KL to that PyTorch model on
the same tokens: what the ARM kernels' KL to PyTorch should be read against.

ONNX folders run the same way in ONNX Runtime: its own aarch64 wheel (PyPI) in Debian's arm64
Python under qemu-user (third_party/build_ort_aarch64.sh), driven by `ort_logits` -- the same code
that gives the x86 logits here, so the two runs differ only in the kernels ORT picks for the CPU
(MLAS' NEON/dotprod/i8mm paths, MatMulNBits' int8 compute). ORT reads the CPU's features from qemu's
CPU model and its core type from /proc/cpuinfo, which is the profile's (`cpuinfo` in targets.yaml).
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


def ort_runtime_dir() -> Path:
    from edgekit.models.sources import cache_dir

    return Path(os.environ.get("EDGEKIT_ORT_AARCH64") or cache_dir() / f"ort-aarch64-{md.version('onnxruntime')}")


def ort_qemu_cpu(profile: dict) -> str:
    emu = emulation_of(profile)
    return emu.get("ort_qemu_cpu", emu["qemu_cpu"])


def ort_emulator(profile: dict) -> tuple[str, Path, str]:
    """(qemu-aarch64, the aarch64 ONNX Runtime folder, its python3.X), or a clear error saying how to set it up."""
    emulation_of(profile)
    base, qemu = ort_runtime_dir(), shutil.which("qemu-aarch64")
    pythons = sorted((base / "sysroot" / "usr" / "bin").glob("python3.*")) if (base / ".complete").is_file() else []
    if qemu is None or not pythons:
        missing = "qemu-aarch64 (Debian's qemu-user)" if qemu is None else "ONNX Runtime for aarch64"
        raise EdgekitError(f"cannot emulate '{profile['name']}' for ONNX folders: {missing} is not installed",
                           "run `bash third_party/build_ort_aarch64.sh` once (~1 min: Debian's arm64 Python and "
                           "onnxruntime's aarch64 wheel into ~/.cache/edgekit; apt needs root), then retry")
    return qemu, base, pythons[-1].name


def ort_command(profile: dict, prefix: Path) -> list[str]:
    """The command that runs a Python script in the aarch64 Python under qemu-user, seeing the
    profile's /proc/cpuinfo: qemu's sysroot prefix is `prefix`, a folder of links to the unpacked
    Debian arm64 system plus that one file."""
    qemu, base, python = ort_emulator(profile)
    (prefix / "proc").mkdir(parents=True, exist_ok=True)
    for top in ("lib", "usr", "etc"):
        (prefix / top).symlink_to(base / "sysroot" / top)
    cpu = emulation_of(profile).get("cpuinfo", {})
    entry = (f"BogoMIPS\t: 38.40\nFeatures\t: {cpu.get('features', 'fp asimd')}\nCPU implementer\t: 0x41\n"
             f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {cpu.get('part', '0xd0b')}\nCPU revision\t: 0\n\n")
    (prefix / "proc" / "cpuinfo").write_text("".join(f"processor\t: {i}\n{entry}" for i in range(os.cpu_count() or 1)))
    return [qemu, "-cpu", ort_qemu_cpu(profile), "-L", str(prefix),
            "-E", "LD_LIBRARY_PATH=/lib/aarch64-linux-gnu:/usr/lib/aarch64-linux-gnu",
            "-E", f"PYTHONPATH={base / 'site'}", "-E", "PYTHONNOUSERSITE=1", str(prefix / "usr" / "bin" / python)]


def run_ort(profile: dict, folder: Path, tokens: np.ndarray, threads: int = 2) -> np.ndarray:
    """`ort_logits` for `tokens` (n_chunk, n_ctx) on the target's ONNX Runtime kernels."""
    from edgekit.bench import ort_logits

    with tempfile.TemporaryDirectory(prefix="edgekit-ort-arm-") as tmp:
        ids, out = Path(tmp) / "ids.npy", Path(tmp) / "logits.npy"
        np.save(ids, tokens.astype(np.int64))
        cmd = ort_command(profile, Path(tmp) / "root") + [ort_logits.__file__, str(Path(folder).resolve()), str(ids),
                                                          str(out), str(threads)]
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if run.returncode != 0 or not out.is_file():
            raise EdgekitError(f"ONNX Runtime on '{profile['name']}' kernels failed on {Path(folder).name} (exit {run.returncode})",
                               "its output (last lines):\n" + (run.stdout + run.stderr)[-1500:])
        return np.load(out)


def _stats(base_logits: np.ndarray, logits: np.ndarray, tokens: np.ndarray) -> dict:
    """KLD statistics of `logits` against `base_logits` (both (n_chunk, scored, V)), llama-perplexity's way."""
    n_ctx = tokens.shape[1]
    stats = kld.KLDStats()
    for base, cand, chunk in zip(base_logits, logits, tokens):
        stats.add(kld.log_softmax(base), cand, chunk[n_ctx // 2 + 1:])
    return stats.result()


def emulated_onnx_parity(folder: Path, profile: dict, text_ids: list[int], ctx: int, max_chunks: int = 8,
                         reference=None) -> dict:
    """One int4 ONNX folder on one target's ONNX Runtime kernels: KL, top-1 and perplexity against
    ONNX Runtime on x86 (the same `ort_logits` code), and against `reference` (a PyTorch scorer of
    the model the folder was built from) with the floor (x86 ORT vs that model)."""
    import torch

    from edgekit.bench.ort_logits import chunk_logits

    tokens = kld.chunks(text_ids, ctx, max_chunks)
    qemu_cpu = ort_qemu_cpu(profile)
    with status(f"ONNX Runtime on x86: {Path(folder).name}"):
        x86 = chunk_logits(folder, tokens)
    with status(f"ONNX Runtime on '{profile['name']}' kernels (qemu {qemu_cpu}): {Path(folder).name}"):
        arm = run_ort(profile, folder, tokens)
    vs_x86 = _stats(x86, arm, tokens)
    row = {"file": Path(folder).name, "target": profile["name"], "emulated": True, "runtime": "onnxruntime",
           "kernels": f"onnxruntime {md.version('onnxruntime')} aarch64", "qemu_cpu": qemu_cpu, "ctx": ctx,
           "chunks": int(tokens.shape[0]), "note": "emulated: ARM kernels exact, speed not measured",
           "kl_vs_x86": vs_x86["kld_mean"], "kl_vs_x86_max": vs_x86["kld_max"], "top1_vs_x86": vs_x86["same_top"],
           "ppl": vs_x86["ppl"], "ppl_x86": vs_x86["ppl_base"], "tokens": vs_x86["tokens"]}
    if reference is not None:
        with bar(len(tokens), f"PyTorch logits {Path(folder).name}", unit="chunk") as progress:
            ref = []
            for c in tokens:
                ref.append(reference(torch.from_numpy(c.astype(np.int64))).float().numpy()[kld.scored(ctx), :x86.shape[-1]])
                progress.update(1)
        ref = np.stack(ref)
        vs_torch, floor = _stats(ref, arm, tokens), _stats(ref, x86, tokens)
        row.update({"kl_vs_torch": vs_torch["kld_mean"], "top1_vs_torch": vs_torch["same_top"],
                    "floor_kl": floor["kld_mean"], "floor_top1": floor["same_top"], "ppl_torch": vs_torch["ppl_base"]})
    return row


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
    """`edgekit bench --emulate`: every GGUF (llama.cpp) and ONNX folder (ONNX Runtime) on every
    emulated target among `targets`, on the text in `data` (tokenized by each file's own
    tokenizer), against x86 and, with `reference` (a model directory, embedded:NAME or hub id with
    the same vocabulary), PyTorch."""
    from edgekit.bench.eval_cmd import open_model, reference_scorer
    from edgekit.bench.targets import target
    from edgekit.data.documents import load_documents

    profiles = [p for p in (target(t) for t in targets) if p.get("emulate")]
    if not profiles:
        raise EdgekitError("--emulate needs a target with an ARM build",
                           "add --target " + " or --target ".join(_emulated_names()))
    ggufs = [f for f in files if f.suffix == ".gguf"]
    folders = [f for f in files if f.is_dir() and (f / "genai_config.json").is_file()]
    if len(ggufs) + len(folders) < len(files):
        odd = [str(f) for f in files if f not in ggufs and f not in folders]
        raise EdgekitError(f"--emulate runs GGUF files (llama.cpp) and onnxruntime-genai folders (ONNX Runtime); "
                           f"not one of those: {', '.join(odd)}", "pass .gguf files or folders written by the export stage")
    for prof in profiles:  # not built: fail before anything runs, saying how to build it
        if ggufs:
            emulator(prof)
        if folders:
            ort_emulator(prof)
    text = "\n\n".join(d.render() for d in load_documents(data, Path.cwd()))
    rows = []
    for path in ggufs + folders:
        opened = open_model(path)
        ids = opened.encode(text)
        ref = reference_scorer(reference, ctx, opened.n_vocab) if reference else None
        parity = emulated_parity if path in ggufs else emulated_onnx_parity
        rows += [parity(path, prof, ids, ctx, max_chunks, ref) for prof in profiles]
    return rows
