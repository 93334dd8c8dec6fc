"""Sequence-level KD data: the teacher answers prompts; filters keep the good answers.

Provenance (sampling settings, counts per filter) goes into the dataset's stats so a run
says exactly how its training text was made.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import torch

from edgekit.data.documents import Document
from edgekit.errors import EdgekitError
from edgekit.progress import bar


def prompt_texts(docs: list[Document]) -> list[str]:
    """A prompt per document: the user turn of chat rows, else the text itself."""
    out = []
    for d in docs:
        if d.messages:
            users = [c for r, c in d.messages if r == "user"]
            out.append(users[0] if users else d.messages[0][1])
        else:
            out.append(d.text)
    return out


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                     batch_size: int, seed: int) -> list[dict]:
    """[{"prompt", "response", "truncated"}] in prompt order; batched with left padding."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    from edgekit.parallel import place, train_device

    model.eval()
    device = train_device()
    place(model, device)
    rows = []
    progress = bar(len(prompts), "teacher generation", unit="prompt")
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i: i + batch_size]
        chat = bool(getattr(tokenizer, "chat_template", None))
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in batch] if chat else batch
        # a chat template writes its own BOS; plain text gets the tokenizer's (Gemma, Llama)
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        new = out[:, enc["input_ids"].shape[1]:]
        for p, ids in zip(batch, new):
            ids = ids.tolist()
            eos = tokenizer.eos_token_id
            ended = eos in ids
            text = tokenizer.decode(ids[: ids.index(eos)] if ended else ids, skip_special_tokens=True)
            rows.append({"prompt": p, "response": text.strip(), "truncated": not ended})
        progress.update(len(batch))
    progress.close()
    place(model, torch.device("cpu"))
    return rows


def _shingles(text: str, n: int = 5) -> set:
    words = re.sub(r"\s+", " ", text.lower()).split()
    return {tuple(words[i: i + n]) for i in range(max(1, len(words) - n + 1))}


def filter_answers(rows: list[dict], min_chars: int, max_chars: int, drop_truncated: bool,
                   near_duplicate: float, verifier: str | None) -> tuple[list[dict], dict]:
    """Drop empty, truncated, too short/long, exact and near duplicate answers, and those a
    verifier command rejects (it reads {"prompt", "response"} JSON on stdin; exit 0 keeps)."""
    kept, seen, shingles = [], set(), []
    dropped = {"empty": 0, "truncated": 0, "length": 0, "duplicate": 0, "near_duplicate": 0, "verifier": 0}
    for r in rows:
        text = r["response"]
        if not text:
            dropped["empty"] += 1
        elif drop_truncated and r["truncated"]:
            dropped["truncated"] += 1
        elif not min_chars <= len(text) <= max_chars:
            dropped["length"] += 1
        elif text in seen:
            dropped["duplicate"] += 1
        elif near_duplicate < 1 and any(_jaccard(_shingles(text), s) >= near_duplicate for s in shingles):
            dropped["near_duplicate"] += 1
        elif verifier and not _verify(verifier, r):
            dropped["verifier"] += 1
        else:
            kept.append({"prompt": r["prompt"], "response": text})
            seen.add(text)
            shingles.append(_shingles(text))
    return kept, {"generated": len(rows), "kept": len(kept), "dropped": dropped}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def _verify(command: str, row: dict) -> bool:
    try:
        proc = subprocess.run(shlex.split(command), input=json.dumps(row), text=True, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EdgekitError(f"verifier command '{command}' could not run: {e}", "check the command and that it exits within 60 s") from None
    return proc.returncode == 0
