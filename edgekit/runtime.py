"""Load an exported model and generate: the code an app embeds.

    import edgekit.runtime
    m = edgekit.runtime.load("runs/quickstart/export")          # a bundle, a .gguf or an ONNX folder
    print(m.generate("The capital of France is", max_tokens=16))
    for piece in m.chat([{"role": "user", "content": "Hi!"}], stream=True):
        print(piece, end="", flush=True)

GGUF files run on llama.cpp (llama-cpp-python), int4 ONNX folders on onnxruntime-genai.
Chat applies the model's own chat template (stored in the GGUF / the folder's tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from edgekit.errors import EdgekitError


def load(path: str | Path, threads: int | None = None, n_ctx: int = 2048):
    path = Path(path)
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
        return OrtModel(path)
    if path.suffix == ".gguf":
        return LlamaModel(path, threads, n_ctx)
    raise EdgekitError(f"{path} is neither a .gguf file nor an ONNX model folder", "pass runs/<name>/export or a model file")


class LlamaModel:
    backend = "llama.cpp"

    def __init__(self, path: Path, threads: int | None, n_ctx: int):
        from edgekit.bench.llama_runner import load_llama

        self.path = path
        self.llm = load_llama(path, n_ctx=n_ctx, threads=threads)
        self.last_finish_reason: str | None = None  # "stop" or "length", once a generation has ended
        self.last_usage: dict | None = None  # {"prompt_tokens", "completion_tokens"} of the last generation

    def _result(self, out, stream: bool, key: str):
        self.last_finish_reason = self.last_usage = None
        if not stream:
            self.last_finish_reason, self.last_usage = out["choices"][0]["finish_reason"], out.get("usage")
            return out["choices"][0][key] if key == "text" else out["choices"][0]["message"]["content"]
        return self._pieces(out, key)

    def _pieces(self, chunks, key: str) -> Iterator[str]:
        for chunk in chunks:
            c = chunk["choices"][0]
            self.last_finish_reason = c.get("finish_reason") or self.last_finish_reason
            piece = c["text"] if key == "text" else c["delta"].get("content")
            if piece:
                yield piece

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, stream: bool = False):
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, stream=stream)
        return self._result(out, stream, "text")

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0, stream: bool = False):
        out = self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature, stream=stream)
        return self._result(out, stream, "message")


class OrtModel:
    backend = "onnxruntime"

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        from edgekit.bench.ort_runner import load_og

        self.path = folder
        self.model = load_og(folder)
        self.tokenizer = og.Tokenizer(self.model)
        self._og = og
        self.last_finish_reason: str | None = None
        self.last_usage: dict | None = None
        self._hf_tokenizer = None  # for the chat template, loaded on the first chat()

    def _stream(self, prompt: str, max_tokens: int, temperature: float) -> Iterator[str]:
        og = self._og
        self.last_finish_reason = self.last_usage = None
        ids = self.tokenizer.encode(prompt)
        params = og.GeneratorParams(self.model)
        search = {"max_length": len(ids) + max_tokens}
        search.update({"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False})
        params.set_search_options(**search)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)
        decoder = self.tokenizer.create_stream()
        count = 0
        while not gen.is_done():
            gen.generate_next_token()
            count += 1
            yield decoder.decode(gen.get_next_tokens()[0])
        self.last_finish_reason = "length" if count >= max_tokens else "stop"
        self.last_usage = {"prompt_tokens": len(ids), "completion_tokens": count}

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, stream: bool = False):
        pieces = self._stream(prompt, max_tokens, temperature)
        return pieces if stream else "".join(pieces)

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0, stream: bool = False):
        from transformers import AutoTokenizer

        if self._hf_tokenizer is None:
            self._hf_tokenizer = AutoTokenizer.from_pretrained(self.path)
        tok = self._hf_tokenizer
        if not getattr(tok, "chat_template", None):
            raise EdgekitError(f"{self.path} has no chat template", "use generate() with a plain prompt")
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.generate(prompt, max_tokens, temperature, stream)
