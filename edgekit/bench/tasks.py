"""Task accuracy through a model's own runtime: multiple choice by log-likelihood, and exact match.

A task file is JSONL, one item per line:

    {"prompt": "The module for regular expressions is", "choices": [" re", " os"], "answer": 0}
    {"prompt": "2 + 2 =", "answer": "4"}

With `choices`, the item is multiple choice: each choice is scored by the summed
log-probability of its tokens after the prompt, and the item is right when the answer
(an index or the choice's text) scores highest; `acc_norm` divides by the choice's length
in bytes first (lm-evaluation-harness's acc_norm). Without `choices`, the model continues the
prompt greedily and the item is right when the first non-empty line of what it wrote equals the answer
(case and surrounding whitespace and final punctuation ignored).

Everything goes through a Scorer ((T,) ids -> (T, V) logits), so a GGUF in llama.cpp, an ONNX
folder in ONNX Runtime and a PyTorch reference are graded by the same code on the same ids.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgekit.bench.quality import Scorer
from edgekit.errors import EdgekitError
from edgekit.progress import bar


def load_tasks(path: Path) -> list[dict]:
    """Validated items of a task JSONL file (clear errors naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"task file {path} does not exist", "pass a JSONL file of {prompt, choices, answer} items")
    from edgekit.data.documents import read_jsonl

    items = []
    for n, item in read_jsonl(path):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or "answer" not in item:
            raise EdgekitError(f"{path}:{n} needs a string 'prompt' and an 'answer'",
                               'e.g. {"prompt": "...", "choices": ["a", "b"], "answer": 0} or {"prompt": "...", "answer": "text"}')
        choices = item.get("choices")
        if choices is not None:
            if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
                raise EdgekitError(f"{path}:{n}: 'choices' must be a list of at least two non-empty strings", "")
            answer = item["answer"]
            if isinstance(answer, str):
                if answer not in choices:
                    raise EdgekitError(f"{path}:{n}: answer {answer!r} is not one of the choices", "give its index or its exact text")
                answer = choices.index(answer)
            if not (isinstance(answer, int) and 0 <= answer < len(choices)):
                raise EdgekitError(f"{path}:{n}: answer {answer!r} is not an index into the {len(choices)} choices", "")
            item = {**item, "answer": answer}
        elif not isinstance(item["answer"], str):
            raise EdgekitError(f"{path}:{n}: an exact-match item needs a string answer", "or give 'choices' for multiple choice")
        items.append(item)
    if not items:
        raise EdgekitError(f"task file {path} holds no items", "one JSON object per line")
    return items


MAX_NEW_TOKENS = 16  # greedy answer length for exact-match items, unless the caller says otherwise


def check_fits(items: list[dict], tokenize, max_new_tokens: int, window: int, fix: str) -> None:
    """Refuse a task set whose longest item (prompt + longest choice, or prompt + the greedy
    answer) does not fit the scorers' `window` of tokens; `fix` says how to make room."""
    longest = max(len(tokenize(it["prompt"])) + max([len(tokenize(c)) for c in it.get("choices", [])] + [max_new_tokens])
                  for it in items)
    if longest > window:
        raise EdgekitError(f"a task item needs {longest} tokens but the window is {window}", fix.format(longest=longest))


def _normalize(text: str) -> str:
    return text.strip().rstrip(".!,;:").strip().lower()


def _continuation_ids(tokenize, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids) such that together they are the tokenization of the
    joined text where the prompt's tokens are a prefix of it (else tokenized apart)."""
    ctx = tokenize(prompt)
    full = tokenize(prompt + continuation)
    if full[: len(ctx)] == ctx and len(full) > len(ctx):
        return ctx, full[len(ctx):]
    return ctx, tokenize(continuation)


def _logprob(scorer: Scorer, ctx: list[int], cont: list[int]) -> float:
    row = torch.tensor(ctx + cont, dtype=torch.long)
    logp = torch.log_softmax(scorer(row)[len(ctx) - 1: -1].float(), -1)
    return float(logp.gather(-1, row[len(ctx):, None]).sum())


def _greedy(scorer: Scorer, ctx: list[int], detokenize, max_new: int, stop_ids: set[int]) -> str:
    """Greedy continuation by rescoring the growing row (answers are a few tokens long)."""
    ids = list(ctx)
    for _ in range(max_new):
        nxt = int(scorer(torch.tensor(ids, dtype=torch.long))[-1].argmax())
        if nxt in stop_ids:
            break
        ids.append(nxt)
        if "\n" in detokenize(ids[len(ctx):]).lstrip("\n"):
            break
    return detokenize(ids[len(ctx):])


def grade(items: list[dict], scorers: dict[str, Scorer], tokenize, detokenize, stop_ids: set[int] = frozenset(),
          max_new_tokens: int = MAX_NEW_TOKENS, desc: str = "tasks", bos: int | None = None) -> dict:
    """Accuracy of every scorer on the items, on identical token ids; `bos` goes before every
    prompt (models whose text always starts with BOS: Gemma, Llama).

    Returns {name: {"mc_items", "acc", "acc_norm", "em_items", "exact_match"}} (None where a
    kind of item is absent) and "chance": the expected multiple-choice accuracy of a guess.
    """
    mc = [it for it in items if "choices" in it]
    em = [it for it in items if "choices" not in it]
    first = [bos] if bos is not None else []
    prepared = [[(first + p, c) for p, c in (_continuation_ids(tokenize, it["prompt"], ch) for ch in it["choices"])] for it in mc]
    em_ctx = [first + tokenize(it["prompt"]) for it in em]
    out: dict = {}
    progress = bar(len(scorers) * (sum(len(it["choices"]) for it in mc) + len(em)), desc, unit="item")
    for name, scorer in scorers.items():
        right = right_norm = right_em = 0
        for it, pairs in zip(mc, prepared):
            lps = [_logprob(scorer, ctx, cont) for ctx, cont in pairs]
            progress.update(len(pairs))
            norm = [lp / len(c.encode()) for lp, c in zip(lps, it["choices"])]
            right += max(range(len(lps)), key=lps.__getitem__) == it["answer"]
            right_norm += max(range(len(norm)), key=norm.__getitem__) == it["answer"]
        for it, ctx in zip(em, em_ctx):
            text = next((line for line in _greedy(scorer, ctx, detokenize, max_new_tokens, stop_ids).split("\n") if line.strip()), "")
            right_em += _normalize(text) == _normalize(it["answer"])
            progress.update(1)
        out[name] = {"mc_items": len(mc), "acc": right / len(mc) if mc else None,
                     "acc_norm": right_norm / len(mc) if mc else None,
                     "em_items": len(em), "exact_match": right_em / len(em) if em else None}
    progress.close()
    out["chance"] = sum(1 / len(it["choices"]) for it in mc) / len(mc) if mc else None
    return out
