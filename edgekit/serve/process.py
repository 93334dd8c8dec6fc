"""The served model runs in a child process, so generating never starves the HTTP server.

onnxruntime-genai's `generate_next_token` holds Python's GIL for the whole decoding step
(measured with py-spy: the generating thread "active+gil" inside ORT's Run, the event loop
waiting on the GIL). In one process the event loop then got the GIL back about once per token,
each I/O call it made cost a token's time, and a server generating on an ONNX folder answered
neither /health, nor a new request, nor noticed a client that hung up, until the generation
ran to the end of its context. In a child process the model can hold its own GIL as long as
it likes. llama.cpp (ctypes) releases the GIL, but llama-cpp-python samples in Python, so
every backend is served the same way.

`ModelProcess` has the runtime model's interface (generate, chat, backend, n_ctx, path,
last_usage, last_finish_reason; `stop_when` checked before every token) and forwards each call
over a pipe; the child checks a shared stop flag before every token. A child that dies (a
crash, the OOM killer) fails the request it was serving with an error and is started again
for the next one.
"""

from __future__ import annotations

import itertools
import multiprocessing
import signal
import time
from typing import Iterator

from edgekit.errors import EdgekitError

POLL_S = 0.02  # how often the parent looks at the stop condition while the child generates
DRAIN_S = 30.0  # a child that has not ended a stopped generation after this long is restarted


class ModelProcess:
    def __init__(self, path, **load_kw):
        self._spawn = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._path, self._load_kw = str(path), load_kw
        self._ids = itertools.count(1)
        self.last_finish_reason: str | None = None
        self.last_usage: dict | None = None
        self._start()

    def _start(self) -> None:
        if hasattr(self, "_conn"):  # a restart after the child died
            self._conn.close()
        self._conn, child_conn = self._spawn.Pipe()
        self._stop = self._spawn.Event()
        self._proc = self._spawn.Process(target=_child, args=(child_conn, self._stop, self._path, self._load_kw),
                                         name="edgekit-model", daemon=True)
        self._proc.start()
        child_conn.close()
        try:
            reply = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise EdgekitError(f"the model process for {self._path} exited while loading it (exit code "
                               f"{self._proc.exitcode})", "check that the model loads with `edgekit chat`") from None
        if reply[0] == "error":
            self._proc.join(5)
            raise EdgekitError(reply[1], reply[2])
        _, info = reply
        self.backend, self.n_ctx, self.path = info["backend"], info["n_ctx"], info["path"]

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, stream: bool = False,
                 stop_when=None):
        return self._call("generate", stream, stop_when, prompt=prompt, max_tokens=max_tokens, temperature=temperature)

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0, stream: bool = False,
             stop_when=None):
        return self._call("chat", stream, stop_when, messages=messages, max_tokens=max_tokens, temperature=temperature)

    def _call(self, method: str, stream: bool, stop_when, **kw):
        pieces = self._pieces((method, stream, kw), stop_when)
        return pieces if stream else "".join(pieces)

    def _pieces(self, call: tuple, stop_when) -> Iterator[str]:
        """Sends the call when the first piece is asked for (a generator never started asks the
        child for nothing), then yields the child's pieces."""
        if not self._proc.is_alive():
            try:
                self._start()
            except EdgekitError as e:  # the model loaded at startup: a failure now is the server's
                raise RuntimeError(f"the model process could not be started again: {e}") from None
        self.last_finish_reason = self.last_usage = None
        rid = next(self._ids)
        self._stop.clear()
        self._conn.send((rid, *call))
        ended = False
        try:
            while True:
                if stop_when is not None and stop_when():
                    self._stop.set()
                msg = self._receive()
                if msg is None:
                    if self._proc.is_alive():
                        continue
                    ended = True
                    self._proc.join(1)
                    raise RuntimeError(f"the model process died (exit code {self._proc.exitcode}); "
                                       "it is started again for the next request")
                if msg[0] != rid:  # what is left of an earlier generation
                    continue
                if msg[1] == "piece":
                    yield msg[2]
                    continue
                ended = True
                if msg[1] == "end":
                    self.last_finish_reason, self.last_usage = msg[2], msg[3]
                    return
                if msg[1] == "error":
                    raise EdgekitError(msg[2], msg[3])
                raise RuntimeError(msg[2])
        finally:
            if not ended:  # the caller stopped reading: end the child's generation before the next one
                self._stop.set()
                self._drain(rid)

    def _receive(self):
        """The child's next message, or None when there is none yet (or the child is gone)."""
        try:
            return self._conn.recv() if self._conn.poll(POLL_S) else None
        except (EOFError, OSError):  # the child died: its end of the pipe closed
            self._proc.join(1)
            return None

    def _drain(self, rid: int) -> None:
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and self._proc.is_alive():
            msg = self._receive()
            if msg is not None and msg[0] == rid and msg[1] != "piece":
                return
        self._proc.kill()  # stuck (or gone): the next call starts a fresh one

    def close(self) -> None:
        """Stops a running generation and the child process."""
        self._stop.set()
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._proc.join(2)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2)


def _child(conn, stop, path: str, load_kw: dict) -> None:
    """The model process: loads the model, then answers calls one at a time until told to end
    (None) or the parent is gone (EOF). Ctrl-C reaches the whole process group: the parent
    decides when this process ends, so SIGINT is ignored here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from edgekit import runtime

    try:
        model = runtime.load(path, **load_kw)
    except EdgekitError as e:
        conn.send(("error", e.what, e.fix))
        return
    except Exception as e:  # noqa: BLE001  reported to the parent as a load failure
        conn.send(("error", f"{path} could not be loaded: {type(e).__name__}: {str(e)[:500]}",
                   "check that it is a model edgekit exported (`edgekit inspect`)"))
        return
    conn.send(("ready", {"backend": model.backend, "n_ctx": model.n_ctx, "path": str(model.path)}))
    while True:
        try:
            call = conn.recv()
        except (EOFError, OSError):
            return
        if call is None:
            return
        rid, method, stream, kw = call
        try:
            _answer(conn, model, stop, rid, method, stream, kw)
        except (BrokenPipeError, EOFError, OSError):
            return


def _answer(conn, model, stop, rid: int, method: str, stream: bool, kw: dict) -> None:
    try:
        out = getattr(model, method)(**kw, stream=stream, stop_when=stop.is_set)
        for piece in (out if stream else [out]):
            conn.send((rid, "piece", piece))
    except EdgekitError as e:
        conn.send((rid, "error", e.what, e.fix))
        return
    except Exception as e:  # noqa: BLE001  the runtime failed: this request fails, the process goes on
        conn.send((rid, "failed", f"{type(e).__name__}: {str(e)[:300]}"))
        return
    conn.send((rid, "end", model.last_finish_reason, model.last_usage))
