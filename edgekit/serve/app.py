"""`edgekit serve BUNDLE`: a local OpenAI-compatible HTTP endpoint over edgekit.runtime.

    edgekit serve runs/quickstart/export --port 8080
    # then any OpenAI client: OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")

Routes: GET /v1/models, POST /v1/chat/completions and POST /v1/completions (both with
`stream: true` as server-sent events, ending with `data: [DONE]`), GET /health. Built on
FastAPI + uvicorn. One model generates one request at a time; the others wait in a bounded
first-come-first-served queue (worker.py): a full queue is a 503 with Retry-After. The model
runs in a child process (process.py), so a backend that holds the GIL while it decodes cannot
starve the event loop. A client
that disconnects stops its generation within a token; every request has a time limit; the
body is size-limited; SIGTERM/SIGINT stop the server within about a second, failing what is
in flight with 503. It binds 127.0.0.1; any other address needs --api-key (Bearer).
"""


import asyncio
import hmac
import json
import time
import uuid
from typing import AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgekit.errors import EdgekitError
from edgekit.serve.worker import Job, Worker

MAX_BODY = 1 << 20  # bytes of a request body: ~250k tokens of prompt, far past any context here
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_BODY)


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
    prompt: str = Field(max_length=MAX_BODY)


def require_server_libs():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise EdgekitError("`edgekit serve` needs FastAPI and uvicorn", "pip install 'edgekit[serve]'") from None


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware in front of the app: /v1/ routes need `Authorization: Bearer <api_key>`
    when one is set (401), and a request body over `limit` bytes is a 413, whether it declares
    its length or streams chunks; nothing past the limit is buffered. Plain ASGI, not
    Starlette's BaseHTTPMiddleware, which would hide client disconnects from the routes."""

    def __init__(self, app, limit: int = MAX_BODY, api_key: str | None = None):
        self.app, self.limit, self.api_key = app, limit, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return await _send_json(send, 401, _error_body("missing or wrong API key (Authorization: Bearer ...)",
                                                               "authentication_error"))
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_json(send, 413, _error_body(f"request body over {self.limit:,} bytes"))
        seen = 0
        started = refused = False

        async def limited_receive():
            # past the limit: answer 413 here, before the app can turn the failure into its own 400
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if not started and not refused:
                        refused = True
                        await _send_json(send, 413, _error_body(f"request body over {self.limit:,} bytes"))
                    raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            if refused:  # the 413 has been sent: whatever the app answers after is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            pass


def _error_body(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


ERROR_KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "model_not_found",
               413: "invalid_request_error", 499: "client_closed", 500: "server_error", 503: "overloaded"}


def create_app(model, model_id: str, default_max_tokens: int = 256, queue_size: int = 8,
               request_timeout: float = 300.0, api_key: str | None = None, worker: Worker | None = None):
    """The FastAPI app serving `model` (an edgekit.runtime model) as `model_id`: requests
    queue (at most `queue_size` waiting) in front of one generating worker; each may take
    `request_timeout` seconds in all (queue and generation) before it is cut to what it has."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    worker = worker or Worker(model, queue_size)
    app = FastAPI(title="edgekit serve", version="1")
    app.state.worker = worker
    created = int(time.time())

    def error(status: int, message: str) -> JSONResponse:
        headers = {"Retry-After": "5"} if status == 503 else None
        return JSONResponse(_error_body(message, ERROR_KINDS.get(status, "invalid_request_error")), status_code=status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return error(400, f"{where}: {first['msg']}" if where else first["msg"])

    def check(req: _Sampling) -> JSONResponse | None:
        if req.model not in (None, "", model_id):
            return error(404, f"model '{req.model}' is not served here; this endpoint serves '{model_id}'")
        return None

    async def run(work, req: _Sampling, kind: str, request: Request):
        job = Job(work, asyncio.get_running_loop(), time.monotonic() + request_timeout)
        if not worker.submit(job):
            return error(503, "the server is busy (its queue is full) or stopping; retry shortly")
        return await respond(job, req, kind, request, model_id, error, worker)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_id, "backend": model.backend, "queued": worker.queued(),
                "generating": worker.current is not None, **worker.stats}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "edgekit"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        messages = [m.model_dump() for m in req.messages]
        limit = min(req.limit(default_max_tokens), model.n_ctx)
        return check(req) or await run(lambda stop_when: model.chat(messages, max_tokens=limit, temperature=req.temperature,
                                                                    stream=req.stream, stop_when=stop_when), req, "chat", request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        limit = min(req.limit(default_max_tokens), model.n_ctx)
        return check(req) or await run(lambda stop_when: model.generate(req.prompt, max_tokens=limit, temperature=req.temperature,
                                                                        stream=req.stream, stop_when=stop_when), req,
                                       "completion", request)

    return Guard(app, MAX_BODY, api_key)


async def next_event(job: Job, request, worker: Worker) -> tuple:
    """The job's next event; while waiting, a client that disconnects cancels the job."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.2)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                worker.cancel(job)
                return ("error", 499, "the client went away")


async def respond(job: Job, req: _Sampling, kind: str, request, model_id: str, error, worker: Worker):
    """The job's answer: one JSON body, or (stream) server-sent events once the first piece
    (or an error, as its HTTP status) has arrived."""
    from fastapi.responses import JSONResponse, StreamingResponse

    first = await next_event(job, request, worker)
    if first[0] == "error":
        return error(first[1], first[2])
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if not req.stream:
        _, text, finish, usage = first
        return JSONResponse(whole_body(rid, kind, model_id, text, finish, usage))
    return StreamingResponse(sse_events(job, first, rid, kind, model_id, worker), media_type="text/event-stream")


def whole_body(rid: str, kind: str, model_id: str, text: str, finish: str, usage: dict) -> dict:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    body = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
            "model": model_id, "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                         "total_tokens": prompt + completion}}
    if kind == "chat":
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]
    else:
        body["choices"] = [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
    return body


async def sse_events(job: Job, first: tuple, rid: str, kind: str, model_id: str, worker: Worker) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format. If the client disconnects, Starlette
    cancels this generator and `finally` stops the job within a token."""
    head = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_id}

    def chunk(text: str | None, finish: str | None, first_chunk: bool = False) -> str:
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if first_chunk else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    try:
        if kind == "chat":
            yield chunk(None, None, first_chunk=True)
        event = first
        while event[0] == "piece":
            if event[1]:
                yield chunk(event[1], None)
            event = await job.events.get()
        if event[0] == "error":  # shutting down, or the runtime failed mid-stream
            yield f"data: {json.dumps(_error_body(event[2], ERROR_KINDS.get(event[1], 'server_error')))}\n\n"
        else:
            yield chunk(None, event[2])
        yield "data: [DONE]\n\n"
    finally:
        worker.cancel(job)  # a no-op for a finished job


def serve(path: str, host: str, port: int, threads: int | None, n_ctx: int, max_tokens: int,
          api_key: str | None = None, queue_size: int = 8, request_timeout: float = 300.0, draft: str | None = None,
          draft_tokens: int = 4) -> None:
    import sys
    from pathlib import Path

    require_server_libs()
    import uvicorn

    from edgekit.serve.process import ModelProcess

    if host not in LOOPBACK and not api_key:
        raise EdgekitError(f"serving on {host} would let anyone who can reach this machine use the model",
                           "pass --api-key KEY (clients send Authorization: Bearer KEY), or keep the default 127.0.0.1")
    model = ModelProcess(path, threads=threads, n_ctx=n_ctx, draft=draft, draft_tokens=draft_tokens)
    model_id = Path(model.path).name
    worker = Worker(model, queue_size)
    app = create_app(model, model_id, max_tokens, queue_size, request_timeout, api_key, worker)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: stop generating now, then shut down
            worker.stop()
            self.force_exit = self.should_exit  # a second signal: exit without waiting
            super().handle_exit(sig, frame)

    print(f"serving {model.path} ({model.backend}) as '{model_id}' on http://{host}:{port}/v1 "
          f"(OpenAI-compatible: /v1/chat/completions, /v1/completions, /v1/models; queue {queue_size}, "
          f"time limit {request_timeout:.0f} s per request); Ctrl-C stops", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1,
                            limit_concurrency=4 * queue_size + 16, timeout_keep_alive=5)
    try:
        Server(config).run()
    finally:
        model.close()
