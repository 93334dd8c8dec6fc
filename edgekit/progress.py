"""Progress display for long work (rich spinners and bars, quiet when not a terminal)."""

from __future__ import annotations

import contextlib
import sys
import time

from tqdm.auto import tqdm


@contextlib.contextmanager
def status(message: str):
    """Say what is starting and how long it took (for steps without a natural count)."""
    print(f"… {message}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    print(f"✓ {message} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)


def bar(total: int, desc: str, unit: str = "it", disable: bool = False):
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                mininterval=2.0, disable=disable)
