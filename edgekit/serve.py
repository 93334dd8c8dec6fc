"""`edgekit serve BUNDLE`: a local OpenAI-compatible HTTP endpoint over edgekit.runtime.

    edgekit serve runs/quickstart/export --port 8080
    # then any OpenAI client: OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")

Routes: GET /v1/models, POST /v1/chat/completions and POST /v1/completions (both with
`stream: true` as server-sent events, ending with `data: [DONE]`), GET /health. Built on
FastAPI + uvicorn. One model, one request generating at a time (a lock): it is a local
endpoint for an app on the same machine, and it binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgekit.errors import EdgekitError


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (top_p, n=1, ...)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stream: bool = False

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str


def require_server_libs():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise EdgekitError("`edgekit serve` needs FastAPI and uvicorn", "pip install 'edgekit[serve]'") from None


def create_app(model, model_id: str, default_max_tokens: int = 256):
    """The FastAPI app serving `model` (an edgekit.runtime model) as `model_id`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="edgekit serve", version="1")
    lock = threading.Lock()
    created = int(time.time())

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return error(400, f"{where}: {first['msg']}" if where else first["msg"])

    def check_model(req: _Sampling):
        if req.model not in (None, "", model_id):
            return error(404, f"model '{req.model}' is not served here; this endpoint serves '{model_id}'", "model_not_found")
        return None

    def run(generate, req: _Sampling, kind: str):
        """Stream, or return whole, one generation (`generate(stream)`), holding the model's lock throughout."""
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        ended = {}

        def pieces(stream: Iterator[str]) -> Iterator[str]:
            with lock:
                yield from stream
                ended["finish"] = model.last_finish_reason or "stop"

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text or "", "finish_reason": finish}

        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        if req.stream:
            # called here, not inside the response body, so that a refusal (no chat template) is
            # an HTTP error; the runtimes' streams do no model work until they are iterated
            stream = generate(True)

            def events() -> Iterator[str]:
                head = {"id": rid, "object": obj, "created": int(time.time()), "model": model_id}
                if kind == "chat":
                    yield f"data: {json.dumps({**head, 'choices': [choice(None, None, first=True)]})}\n\n"
                for piece in pieces(stream):
                    if piece:
                        yield f"data: {json.dumps({**head, 'choices': [choice(piece, None)]})}\n\n"
                yield f"data: {json.dumps({**head, 'choices': [choice(None, ended['finish'])]})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        with lock:
            text = generate(False)
            usage, finish = model.last_usage or {}, model.last_finish_reason or "stop"
        body = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": model_id,
                "usage": {"prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
                          "total_tokens": usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)}}
        if kind == "chat":
            body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]
        else:
            body["choices"] = [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
        return JSONResponse(body)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_id, "backend": model.backend}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "edgekit"}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        bad = check_model(req)
        if bad:
            return bad
        messages = [m.model_dump() for m in req.messages]
        try:
            return run(lambda stream: model.chat(messages, max_tokens=req.limit(default_max_tokens),
                                                 temperature=req.temperature, stream=stream), req, "chat")
        except EdgekitError as e:  # e.g. a model without a chat template
            return error(400, str(e))

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        bad = check_model(req)
        if bad:
            return bad
        return run(lambda stream: model.generate(req.prompt, max_tokens=req.limit(default_max_tokens),
                                                 temperature=req.temperature, stream=stream), req, "completion")

    return app


def serve(path: str, host: str, port: int, threads: int | None, n_ctx: int, max_tokens: int) -> None:
    import sys
    from pathlib import Path

    require_server_libs()
    import uvicorn

    from edgekit import runtime

    model = runtime.load(path, threads=threads, n_ctx=n_ctx)
    model_id = Path(model.path).name
    app = create_app(model, model_id, max_tokens)
    print(f"serving {model.path} ({model.backend}) as '{model_id}' on http://{host}:{port}/v1 "
          "(OpenAI-compatible: /v1/chat/completions, /v1/completions, /v1/models); Ctrl-C stops", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
