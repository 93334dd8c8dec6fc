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
    Returns {name: {"ppl", "nll", "tokens"}, "candidate|reference": {"kl", "top1", "kld_median",
    "kld_p99", "kld_p999", "kld_max", "ppl_ratio"}}: the KL statistics llama.cpp's
    `llama-perplexity --kl-divergence` reports (mean, median, tail percentiles, max, same top
    token, perplexity ratio), over every scored position.
    """
    nll = {k: 0.0 for k in scorers}
    kl = {p: [] for p in pairs}  # per-position KL, for the median and tail
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
            kl[(cand, ref)].append((lr.exp() * (lr - lc)).sum(-1).double())
            agree[(cand, ref)] += float((lr.argmax(-1) == lc.argmax(-1)).sum())
        count += row.numel() - 1
    progress.close()
    out: dict = {k: {"ppl": math.exp(v / count), "nll": v / count, "tokens": count} for k, v in nll.items()}
    for p in pairs:
        values = torch.cat(kl[p]) if kl[p] else torch.zeros(1, dtype=torch.float64)
        q = torch.quantile(values, torch.tensor([0.5, 0.99, 0.999], dtype=torch.float64)).tolist()
        out[f"{p[0]}|{p[1]}"] = {"kl": float(values.sum()) / count, "top1": agree[p] / count, "kld_median": q[0],
                                 "kld_p99": q[1], "kld_p999": q[2], "kld_max": float(values.max()),
                                 "ppl_ratio": math.exp(out[p[0]]["nll"] - out[p[1]]["nll"])}
    return out
