"""Files are never written in place: write to a temporary name, then rename.

A reader (or a resumed run) therefore sees either the old complete file or the new
complete file, never a half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Hash of a file, or of a directory's relative names and file contents."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it onto `final` on success.

    Works for files and directories. On error the temporary is removed and `final`
    is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace(src: Path, dst: Path) -> None:
    """Move `src` onto `dst`; an existing directory `dst` is swapped out, then removed."""
    if dst.is_dir() and not dst.is_symlink():
        trash = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def confine(base: Path, relative: str | Path, what: str) -> Path:
    """Resolve `relative` under `base` and refuse paths that escape it."""
    from edgekit.errors import EdgekitError

    base = base.resolve()
    p = (base / relative).resolve()
    if p != base and base not in p.parents:
        raise EdgekitError(f"{what} '{relative}' escapes the run directory {base}",
                           "use a path inside the run directory (no '..' or absolute paths)")
    return p


@contextlib.contextmanager
def quiet_stderr():
    """Silence C libraries (llama.cpp) that log to fd 2, unless EDGEKIT_DEBUG is set."""
    if os.environ.get("EDGEKIT_DEBUG"):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc `malloc_trim`): after a
    model copy is dropped, its pages otherwise stay in the process and add to the peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc (macOS, musl): nothing to trim
        pass


@contextlib.contextmanager
def exclusive_lock(directory: Path, what: str):
    """Hold `directory/.lock` (flock) for the block; a second holder is refused at once with
    the first's pid. The kernel drops the lock when its process dies, so a crashed or killed
    holder never leaves it stuck (the file may stay; an unlocked file means nothing)."""
    import fcntl

    from edgekit.errors import EdgekitError

    path = Path(directory) / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise EdgekitError(f"{what} {directory} is in use by another edgekit process (pid {holder})",
                               "wait for it to finish, or run with another --runs-dir or recipe name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def refuse_escaping_links(directory: Path, what: str) -> None:
    """Every symlink under `directory` must point inside it: a run never writes through a link
    to somewhere else (a `data` or `export` folder linked to /etc, say)."""
    from edgekit.errors import EdgekitError

    base = Path(directory).resolve()
    for root, dirs, files in os.walk(base):  # links to directories are listed, not followed
        for name in dirs + files:
            p = Path(root) / name
            if p.is_symlink():
                target = p.resolve()
                if target != base and base not in target.parents:
                    raise EdgekitError(f"{what} holds {p.relative_to(base)}, a link to {target} outside it",
                                       f"remove the link (rm '{p}'); edgekit writes only inside {base}")
