"""Quality on held-out text: perplexity, KL to a reference, top-1 agreement.

A "scorer" maps one row of token ids (T,) to next-token logits (T, V) as a float32
torch tensor; PyTorch models and llama.cpp files both provide one, so the same code
compares a GGUF run by llama.cpp against the PyTorch model it came from. Rows are
scored one at a time, so memory holds 2 x T x V floats, not the whole holdout.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from edgekit.errors import EdgekitError
from edgekit.progress import bar

Scorer = Callable[[torch.Tensor], torch.Tensor]  # (T,) int64 -> (T, V) float32


def torch_scorer(model) -> Scorer:
    model.eval()

    @torch.no_grad()
    def score(row: torch.Tensor) -> torch.Tensor:
        return model(input_ids=row[None]).logits[0].float()

    return score


def evaluate(scorers: dict[str, Scorer], rows: torch.Tensor, pairs: list[tuple[str, str]] = (),
             desc: str = "eval") -> dict:
    """Perplexity of every scorer on rows (N, T), and for each (candidate, reference) pair
    KL(reference || candidate) and top-1 agreement, in one pass over the rows.

    Positions 0..T-2 predict tokens 1..T-1; KL and agreement use the same positions.
    Returns {name: {"ppl", "nll", "tokens"}, "candidate|reference": {"kl", "top1"}}.
    """
    nll = {k: 0.0 for k in scorers}
    kl = {p: 0.0 for p in pairs}
    agree = {p: 0.0 for p in pairs}
    count = 0
    progress = bar(rows.shape[0] * len(scorers), desc, unit="row")
    for row in rows:
        logp = {}
        for name, scorer in scorers.items():
            logits = scorer(row)[:-1]  # (T-1, V)
            if torch.isnan(logits).any() or torch.isposinf(logits).any():  # -inf is a legitimate impossible token
                raise EdgekitError(f"{name} computes NaN or infinite logits on the evaluation text",
                                   "its weights are corrupt (NaN/Inf) or overflow: re-export the model, or check it in float32")
            logp[name] = F.log_softmax(logits, -1)
            nll[name] += float(-logp[name].gather(-1, row[1:, None]).sum())
            progress.update(1)
        for cand, ref in pairs:
            vocab = min(logp[cand].shape[-1], logp[ref].shape[-1])  # llama.cpp may pad the vocabulary
            lc, lr = logp[cand][:, :vocab], logp[ref][:, :vocab]
            kl[(cand, ref)] += float((lr.exp() * (lr - lc)).sum())
            agree[(cand, ref)] += float((lr.argmax(-1) == lc.argmax(-1)).sum())
        count += row.numel() - 1
    progress.close()
    out: dict = {k: {"ppl": math.exp(v / count), "nll": v / count, "tokens": count} for k, v in nll.items()}
    for p in pairs:
        out[f"{p[0]}|{p[1]}"] = {"kl": kl[p] / count, "top1": agree[p] / count}
    return out
