"""Load an exported model and generate: the code an app embeds.

    import edgekit.runtime
    m = edgekit.runtime.load("runs/quickstart/export")          # a bundle, a .gguf or an ONNX folder
    print(m.generate("The capital of France is", max_tokens=16))
    for piece in m.chat([{"role": "user", "content": "Hi!"}], stream=True):
        print(piece, end="", flush=True)

GGUF files run on llama.cpp (llama-cpp-python), int4 ONNX folders on onnxruntime-genai.
Chat applies the model's own chat template (stored in the GGUF / the folder's tokenizer).
`max_tokens` is capped by what the context leaves after the prompt; a prompt longer than the
context is an EdgekitError with both numbers. `stop_when` (a callable, checked before every
token) ends a generation early: a server stops the work of a client that went away.
onnxruntime-genai holds the GIL for each whole decoding step (llama.cpp's ctypes calls release
it): beside an event loop or a UI thread, run an ONNX model in its own process, as `edgekit
serve` does (edgekit/serve/process.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from edgekit.errors import EdgekitError


def load(path: str | Path, threads: int | None = None, n_ctx: int = 2048, draft: str | Path | None = None,
         draft_tokens: int = 4):
    """`draft`: a small GGUF with the same vocabulary (e.g. from recipes/draft-smollm2.yaml) for
    speculative decoding: it proposes `draft_tokens` tokens, the model checks them in one pass;
    greedy output stays the model's own, token for token (GGUF only)."""
    path = Path(path)
    if path.is_dir() and (path / "draft.json").is_file() and draft is None:  # a target exported with its draft
        import json

        pair = json.loads((path / "draft.json").read_text())
        path, draft, draft_tokens = path / pair["target"], path / pair["draft"], pair.get("draft_tokens", draft_tokens)
    if path.is_dir() and not (path / "genai_config.json").is_file():
        ggufs = sorted(path.glob("*Q4_K_M.gguf")) or sorted(path.glob("*.gguf"))
        onnx = [p for p in sorted(path.iterdir()) if (p / "genai_config.json").is_file()]
        if ggufs:
            path = ggufs[0]
        elif onnx:
            path = onnx[0]
        else:
            raise EdgekitError(f"{path} holds no .gguf file or ONNX model folder", "pass runs/<name>/export or a model file")
    if path.is_dir():
        if draft is not None:
            raise EdgekitError("a draft model speeds up GGUF files (llama.cpp); this is an ONNX folder",
                               "pass the bundle's .gguf file, or drop the draft")
        return OrtModel(path, n_ctx)
    if path.suffix == ".gguf":
        return LlamaModel(path, threads, n_ctx, Path(draft) if draft else None, draft_tokens)
    raise EdgekitError(f"{path} is neither a .gguf file nor an ONNX model folder", "pass runs/<name>/export or a model file")


class LlamaModel:
    backend = "llama.cpp"

    def __init__(self, path: Path, threads: int | None, n_ctx: int, draft: Path | None = None, draft_tokens: int = 4):
        from edgekit.bench.llama_runner import gguf_draft, load_llama

        self.path = path
        # llama.cpp pads the context to a multiple of 256; llama-cpp-python sizes its token buffer
        # by the number asked for, and the two disagree past it: ask for the padded size
        n_ctx = -(-n_ctx // 256) * 256
        self.draft = gguf_draft(draft, n_ctx, draft_tokens, threads) if draft is not None else None
        self.llm = load_llama(path, n_ctx=n_ctx, threads=threads, draft_model=self.draft)
        if self.draft is not None and self.draft.llm.n_vocab() != self.llm.n_vocab():
            raise EdgekitError(f"the draft {draft.name} has {self.draft.llm.n_vocab()} tokens, the model {self.llm.n_vocab()}",
                               "a draft must share the model's tokenizer: distill one from it (recipes/draft-smollm2.yaml)")
        self.last_finish_reason: str | None = None  # "stop" or "length", once a generation has ended
        self.last_usage: dict | None = None  # {"prompt_tokens", "completion_tokens"} of the last generation

    def _result(self, out, stream: bool, key: str):
        self.last_finish_reason = self.last_usage = None
        if not stream:
            self.last_finish_reason, self.last_usage = out["choices"][0]["finish_reason"], out.get("usage")
            if self._ender.full:
                self.last_finish_reason = "length"
            return out["choices"][0][key] if key == "text" else out["choices"][0]["message"]["content"]
        return self._pieces(out, key)

    def _pieces(self, chunks, key: str) -> Iterator[str]:
        for chunk in _context_checked(chunks):
            c = chunk["choices"][0]
            self.last_finish_reason = c.get("finish_reason") or self.last_finish_reason
            piece = c["text"] if key == "text" else c["delta"].get("content")
            if piece:
                yield piece
        if self._ender.full:
            self.last_finish_reason = "length"

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    def _call(self, fn, stop_when, **kw):
        """A prompt that does not fit raises ValueError in llama-cpp-python, on the call or
        (streaming) on the first piece. The generation is ended by a logits processor that
        forces the end-of-text token when `stop_when()` says so, or before the context's last
        slot (llama-cpp-python's own cap lets the last token overflow the KV cache: llama_decode
        fails); chat completions take no stopping criteria, and this way usage is still counted."""
        ender = _Ender(self.llm, stop_when)
        self._ender = ender
        try:
            return fn(logits_processor=ender.processors(), **kw)
        except ValueError as e:
            raise _context_error(e) from None

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, stream: bool = False,
                 stop_when=None):
        out = self._call(self.llm.create_completion, stop_when, prompt=prompt, max_tokens=max_tokens,
                         temperature=temperature, stream=stream)
        return self._result(out, stream, "text")

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0, stream: bool = False,
             stop_when=None):
        out = self._call(self.llm.create_chat_completion, stop_when, messages=messages, max_tokens=max_tokens,
                         temperature=temperature, stream=stream)
        return self._result(out, stream, "message")


class _Ender:
    """Forces llama.cpp's end-of-text token when asked to stop or when the context is full."""

    def __init__(self, llm, stop_when=None):
        self.eos, self.n_ctx, self.stop_when = llm.token_eos(), llm.n_ctx(), stop_when
        self.full = False  # ended because the context was full: finish reason "length"

    def processors(self):
        import llama_cpp

        return llama_cpp.LogitsProcessorList([self])

    def __call__(self, ids, scores):
        self.full = len(ids) + 1 >= self.n_ctx  # the token sampled now would take the context's last slot
        if self.full or (self.stop_when is not None and self.stop_when()):
            import numpy as np

            scores = np.full_like(scores, -np.inf)
            scores[self.eos] = 0.0
        return scores


def _context_error(e: ValueError) -> Exception:
    msg = str(e)
    if "exceed context window" in msg:  # "Requested tokens (N) exceed context window of M"
        return EdgekitError(f"the prompt does not fit: {msg}", "shorten the prompt or load the model with a larger n_ctx")
    return e


def _context_checked(chunks):
    try:
        yield from chunks
    except ValueError as e:
        raise _context_error(e) from None


class OrtModel:
    backend = "onnxruntime"

    def __init__(self, folder: Path, n_ctx: int | None = None):
        """`n_ctx` caps the context below the folder's own (its genai_config's context_length),
        as it sizes llama.cpp's: a request for 100 million tokens stops there."""
        import onnxruntime_genai as og

        from edgekit.bench.ort_runner import load_og, sliding_window

        self.path = folder
        self.model = load_og(folder)
        self.window = sliding_window(folder)
        self.tokenizer = og.Tokenizer(self.model)
        self._og = og
        self.last_finish_reason: str | None = None
        self.last_usage: dict | None = None
        self._hf_tokenizer = None  # for the chat template, loaded on the first chat()
        from edgekit.bounded import read_json

        config = read_json(folder / "genai_config.json", "genai_config")
        own = int(config["model"].get("context_length") or config["search"]["max_length"])
        self.n_ctx = min(own, n_ctx) if n_ctx else own

    def _stream(self, prompt: str, max_tokens: int, temperature: float, stop_when=None) -> Iterator[str]:
        og = self._og
        self.last_finish_reason = self.last_usage = None
        ids = self.tokenizer.encode(prompt)
        if len(ids) >= self.n_ctx:
            raise EdgekitError(f"the prompt does not fit: it is {len(ids)} tokens and the context holds {self.n_ctx}",
                               "shorten the prompt")
        max_tokens = min(max_tokens, self.n_ctx - len(ids))
        params = og.GeneratorParams(self.model)
        search = {"max_length": max(len(ids) + max_tokens, self.window)}  # ORT's cache holds the window at least
        search.update({"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False})
        params.set_search_options(**search)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)
        decoder = self.tokenizer.create_stream()
        count = 0
        while not gen.is_done() and count < max_tokens and not (stop_when and stop_when()):
            gen.generate_next_token()
            count += 1
            yield decoder.decode(gen.get_next_tokens()[0])
        self.last_finish_reason = "length" if count >= max_tokens else "stop"  # stopped early: "stop"
        self.last_usage = {"prompt_tokens": len(ids), "completion_tokens": count}

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, stream: bool = False,
                 stop_when=None):
        pieces = self._stream(prompt, max_tokens, temperature, stop_when)
        return pieces if stream else "".join(pieces)

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0, stream: bool = False,
             stop_when=None):
        from transformers import AutoTokenizer

        if self._hf_tokenizer is None:
            self._hf_tokenizer = AutoTokenizer.from_pretrained(self.path)
        tok = self._hf_tokenizer
        if not getattr(tok, "chat_template", None):
            raise EdgekitError(f"{self.path} has no chat template", "use generate() with a plain prompt")
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.generate(prompt, max_tokens, temperature, stream, stop_when)
