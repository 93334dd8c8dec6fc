"""llama.cpp's own `convert_hf_to_gguf.py`, at the llama.cpp version our runtime runs.

It knows ~125 architectures (tensor names, rotary layouts, rope scaling, pre-tokenizers,
chat templates), so edgekit writes no per-architecture GGUF code: every float GGUF is the
converter's, and edgekit's exact quantizers repack its tensors where a trained grid must
reach the file (gguf_write.py).

The converter ships in llama-cpp-python's source distribution on PyPI (vendor/llama.cpp),
not in its wheel. `make setup` fetches it once (`converter_dir()`, into
~/.cache/edgekit/llama.cpp-src-<version>, `$EDGEKIT_LLAMA_SRC` to move it), so runs and tests
stay offline afterwards; a first use without it fetches it then, with progress.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_path, sha256_tree

CONVERTER = "convert_hf_to_gguf.py"


def converter_path() -> Path:
    """Where the llama.cpp source tree holding the converter lives (fetched or not)."""
    default = Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit")) / f"llama.cpp-src-{_version()}"
    return Path(os.environ.get("EDGEKIT_LLAMA_SRC") or default)


def _version() -> str:
    return md.version("llama-cpp-python")


def converter_dir() -> Path:
    """The llama.cpp source tree holding the converter, fetched when missing."""
    dest = converter_path()
    if not (dest / CONVERTER).is_file():
        fetch(_version(), dest)
    return dest


def fetch(version: str, dest: Path) -> None:
    """llama-cpp-python's sdist from PyPI -> its vendor/llama.cpp at `dest` (whole or absent)."""
    import shutil
    import tarfile
    import tempfile

    from edgekit.progress import status

    with tempfile.TemporaryDirectory() as tmp:
        with status(f"fetching llama.cpp's converter (llama-cpp-python=={version} source, ~75 MB) from PyPI"):
            got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                                  "-d", tmp, f"llama-cpp-python=={version}"], capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if got.returncode != 0 or not archives:
            raise EdgekitError(f"could not fetch llama.cpp's converter (llama-cpp-python=={version} source from PyPI): "
                               f"{(got.stderr or '').strip().splitlines()[-1:] or ['no archive']}",
                               "connect to PyPI once (make setup does it), or point $EDGEKIT_LLAMA_SRC at a llama.cpp "
                               "checkout of that version")
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(tmp, members=members, filter="data")  # "data": no links out, no devices
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(str(Path(tmp) / prefix), partial)
        partial.rename(dest)


@lru_cache(maxsize=1)
def supported_architectures() -> frozenset[str]:
    """The transformers architectures (config.json `architectures`) the converter registers,
    read from its source without importing it (validate stays fast)."""
    src = converter_dir()
    files = [src / CONVERTER, *sorted((src / "conversion").glob("*.py"))]
    names = set()
    for f in files:
        for args in re.findall(r"@ModelBase\.register\(([^)]*)\)", f.read_text(encoding="utf-8")):
            names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
    return frozenset(names)


# Run the converter with TextModel.get_vocab_base_pre answering `pre`: for a BPE tokenizer the
# converter does not recognise (it knows tokenizers by the hash of their output on a test text,
# so any newly trained one is unknown), once edgekit has identified its pre-tokenizer.
_WITH_PRE = """import sys
sys.path.insert(0, sys.argv.pop(1))
pre = sys.argv.pop(1)
sys.argv[0] = "convert_hf_to_gguf.py"
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""
PROBE = ("def f(x):\n    return x**2  # 12,345.67 ≠ 3e-5\n\tTab & \"quotes\" <tags>\n"
         "Ünïcödé: naïve café, 日本語, emoji 🙂; numbers 1234567890; CamelCase snake_case URL https://a.b/c?d=e\n"
         "User: hi!\nAssistant: Hello, how can I help?   ")


def convert(model_dir: Path, out: Path, outtype: str = "f16", tokenizer_replaced: bool = False) -> Path:
    """`model_dir` (config.json + safetensors + tokenizer) as a float GGUF by llama.cpp's converter.
    A BPE tokenizer the converter does not recognise gets the pre-tokenizer edgekit identifies
    from what transformers loads, and is then checked: llama.cpp must tokenize a mixed probe text
    exactly as transformers does, or the conversion is refused. With `tokenizer_replaced` (the
    caller writes the original GGUF's tokenizer metadata over the converter's) neither matters:
    an unrecognised one gets llama.cpp's "default" placeholder."""
    import shutil

    src = converter_dir()
    memo = _memo_path(sha256_tree(model_dir), outtype)
    if memo.is_file():  # this very model converted before (small models only)
        with atomic_path(out) as tmp:
            shutil.copyfile(memo, tmp)
        return out
    tokenizer = _tokenizer_key(model_dir)
    with atomic_path(out) as tmp:
        pre = _PRE.get(tokenizer) if not tokenizer_replaced else None  # identified and checked before, in this process
        proc = _run(src, [str(model_dir), "--outfile", str(tmp), "--outtype", outtype], pre)
        fresh = None
        if proc.returncode != 0 and pre is None and "pre-tokenizer was not recognized" in proc.stderr:
            pre = "default" if tokenizer_replaced else identify_pre_tokenizer(model_dir)
            fresh = None if tokenizer_replaced else pre
            proc = _run(src, [str(model_dir), "--outfile", str(tmp), "--outtype", outtype], pre)
        if proc.returncode != 0 or not Path(tmp).is_file():
            _raise_disk_full(proc.stderr, Path(tmp))
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
            raise EdgekitError(f"llama.cpp's converter could not convert {model_dir.name}: {' | '.join(tail)[:600]}",
                               "check that the model's architecture is one llama.cpp supports (edgekit validate says "
                               "so) and that its directory has config.json, safetensors weights and tokenizer files")
        if fresh is not None:
            check_tokenization(model_dir, Path(tmp), f"pre-tokenizer '{pre}' identified by edgekit")
            _PRE[tokenizer] = pre
        _remember(memo, Path(tmp))
    return out


_PRE: dict[str, str] = {}  # tokenizer key -> the pre-tokenizer identified and checked for it, in this process
_MEMO_BYTES = 64 << 20  # only small models' conversions are kept: tests and small students convert them again and again
_MEMO_FILES = 32


def _memo_path(model_hash: str, outtype: str) -> Path:
    cache = Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit")) / "converted"
    return cache / f"{model_hash[:32]}-{outtype}-llama.cpp-{_version()}.gguf"


def _remember(memo: Path, converted: Path) -> None:
    """Keep a small conversion for the next identical request; the newest _MEMO_FILES stay."""
    import shutil

    if converted.stat().st_size > _MEMO_BYTES:
        return
    memo.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(memo) as tmp:
        shutil.copyfile(converted, tmp)
    kept = sorted(memo.parent.glob("*.gguf"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[_MEMO_FILES:]:
        old.unlink(missing_ok=True)


def _raise_disk_full(stderr: str, path: Path) -> None:
    """The converter ran out of room (disk full, file size limit, quota): the same OSError as
    edgekit's own writes raise, so the CLI reports it the same way."""
    import errno

    for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        if f"[Errno {code}]" in stderr:
            raise OSError(code, os.strerror(code), str(path))
    if re.search(r"OSError: \d+ requested and \d+ written", stderr):  # numpy's tofile on a short write
        raise OSError(errno.ENOSPC, "a write came up short (disk full or file size limit)", str(path))


def _tokenizer_key(model_dir: Path) -> str:
    """What decides how transformers tokenizes with this directory: its tokenizer files and the
    model type (transformers 5 forces some families' pre-tokenizers by model type)."""
    import hashlib

    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).is_file():
            h.update(sha256_tree(model_dir / name).encode())
    config = model_dir / "config.json"
    h.update(str(json.loads(config.read_text()).get("model_type") if config.is_file() else None).encode())
    return h.hexdigest()


def _run(src: Path, args: list[str], pre: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(src / CONVERTER), *args] if pre is None else [sys.executable, "-c", _WITH_PRE, str(src), pre, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=src)


# llama.cpp's pre-tokenizer names for the split regexes it implements, as transformers' tokenizers write them
KNOWN_SPLITS = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "qwen2",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "llama-bpe",
}


def identify_pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp's name for the pre-tokenizer transformers actually uses with this directory
    (transformers 5 may impose a family's own by model type), for the shapes edgekit knows."""
    from transformers import AutoTokenizer

    backend = getattr(AutoTokenizer.from_pretrained(model_dir), "backend_tokenizer", None)
    pre = json.loads(backend.to_str()).get("pre_tokenizer") if backend is not None else None
    parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    if len(parts) == 1 and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        return "gpt-2"  # byte-level BPE with GPT-2's split regex
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)):
        name = KNOWN_SPLITS.get((parts[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise EdgekitError(f"llama.cpp's converter does not recognise the BPE tokenizer of {model_dir.name}, and its "
                       f"pre-tokenizer ({str(pre)[:200]}) is not one edgekit can name for it",
                       "use a tokenizer llama.cpp knows (those of published model families), or add it to llama.cpp's "
                       "convert_hf_to_gguf_update.py")


def check_tokenization(model_dir: Path, gguf_path: Path, what: str) -> None:
    """llama.cpp's tokenization of PROBE must equal transformers'."""
    import llama_cpp
    from transformers import AutoTokenizer

    from edgekit.fsutil import quiet_stderr

    ours = AutoTokenizer.from_pretrained(model_dir)(PROBE, add_special_tokens=False)["input_ids"]
    with quiet_stderr():
        llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    theirs = llm.tokenize(PROBE.encode(), add_bos=False, special=False)
    if list(theirs) != list(ours):
        raise EdgekitError(f"{model_dir.name}: with the {what}, llama.cpp tokenizes text differently from transformers "
                           f"(first difference at token {next(i for i, (a, b) in enumerate(zip(theirs, ours + [-1])) if a != b)})",
                           "use a tokenizer llama.cpp knows, or add it to llama.cpp's convert_hf_to_gguf_update.py")
