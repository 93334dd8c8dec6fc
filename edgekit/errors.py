"""User-facing errors: what went wrong, where, and how to fix it.

Every mistake a user can make (a bad recipe, a missing file, a model that does not
fit the stage) raises `EdgekitError`. The CLI prints its message on one line and
exits with code 2; only `--debug` shows a traceback.
"""

from __future__ import annotations

import difflib


class EdgekitError(Exception):
    """An error caused by input the user can fix. `fix` says how."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if not fix else f"{what}; {fix}")


class RecipeError(EdgekitError):
    """A recipe that is not valid; `problems` lists every one of them."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the recipe:\n{lines}")


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """" did you mean 'x'?" for the closest choice, or '' when nothing is close."""
    word = str(word).lower()
    lowered = [c.lower() for c in choices]
    close = difflib.get_close_matches(word, lowered, n=1, cutoff=0.6)
    if not close:  # a short name for a long one ('smollm' for 'smollm2-135m-instruct')
        close = [c for c in lowered if len(word) >= 4 and (c.startswith(word[:5]) or word in c)][:1]
    if not close:
        return ""
    original = next(c for c in choices if c.lower() == close[0])
    return f"; did you mean '{original}'?"
