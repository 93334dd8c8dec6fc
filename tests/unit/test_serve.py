"""`edgekit serve`: a real server process on localhost, spoken to by the real `openai` client."""

import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


openai = pytest.importorskip("openai")


@pytest.fixture
def bundle(tiny_bundle):
    return tiny_bundle


@contextlib.contextmanager
def server(model_path, *extra: str, procs: list | None = None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "serve", str(model_path), "--port", str(port),
                             "--max-tokens", "6", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if procs is not None:
        procs.append(proc)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"server did not start: {proc.communicate()[1][-2000:]}")
            time.sleep(0.3)
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def test_gguf_chat_and_completions_through_the_openai_client(bundle):
    with server(bundle / "tiny-F16.gguf") as (base, client):
        assert [m.id for m in client.models.list()] == ["tiny-F16.gguf"]
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does the module read?"}]
        whole = client.chat.completions.create(model="tiny-F16.gguf", messages=messages, max_tokens=5, temperature=0)
        assert whole.choices[0].message.role == "assistant"
        assert whole.choices[0].finish_reason in ("stop", "length")
        assert 0 < whole.usage.completion_tokens <= 5 and whole.usage.prompt_tokens > 0
        stream = client.chat.completions.create(model="tiny-F16.gguf", messages=messages, max_tokens=5, temperature=0,
                                                stream=True)
        chunks = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert streamed == whole.choices[0].message.content  # greedy: the same reply either way
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        text = client.completions.create(model="tiny-F16.gguf", prompt="The module", max_tokens=4, temperature=0)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny-F16.gguf", prompt="The module", max_tokens=4, temperature=0, stream=True))
        assert streamed == text.choices[0].text
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.chat.completions.create(model="gpt-4o", messages=messages)
        with pytest.raises(openai.BadRequestError, match="messages"):
            client.chat.completions.create(model="tiny-F16.gguf", messages=[])
        r = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
        assert r.status_code == 400 and "role" in r.json()["error"]["message"]


def test_onnx_folder_serves_completions_and_refuses_chat_without_template(bundle):
    with server(bundle / "tiny-int4-onnx") as (base, client):
        out = client.completions.create(model="tiny-int4-onnx", prompt="The module", max_tokens=4)
        assert out.choices[0].finish_reason in ("stop", "length") and out.usage.prompt_tokens > 0
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny-int4-onnx", prompt="The module", max_tokens=4, stream=True))
        assert streamed == out.choices[0].text
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="tiny-int4-onnx", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="no chat template"):  # streamed too: refused before the stream
            client.chat.completions.create(model="tiny-int4-onnx", messages=[{"role": "user", "content": "hi"}], stream=True)


def test_serve_refuses_a_missing_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgekit.cli", "serve", str(tmp_path / "nope.gguf")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- under abuse and load

LONG = {"prompt": "The module", "max_tokens": 100_000_000, "temperature": 0}


def health(base: str) -> dict:
    return httpx.get(f"{base}/health", timeout=5).json()


def wait_until(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.05)


def wait_idle(base: str, seconds: float) -> float:
    """Seconds until the worker has no running or queued job (fails after `seconds`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        h = health(base)
        if not h["generating"] and not h["queued"]:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"still busy after {seconds} s: {health(base)}")


def test_max_tokens_is_capped_by_the_context_and_a_long_prompt_is_a_400(bundle):
    with server(bundle / "tiny-F16.gguf", "--ctx", "256") as (base, client):
        out = client.completions.create(model="tiny-F16.gguf", **LONG)
        assert 200 < out.usage.prompt_tokens + out.usage.completion_tokens < 256 and out.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match=r"Requested tokens \(\d+\) exceed context window of 256"):
            client.completions.create(model="tiny-F16.gguf", prompt="word " * 500, max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="exceed context window"):  # streamed: refused before the stream
            client.completions.create(model="tiny-F16.gguf", prompt="word " * 500, max_tokens=4, stream=True)
        assert health(base)["status"] == "ok"


@pytest.fixture(scope="module")
def long_model(tmp_path_factory, tiny_tokenizer_dir):
    """A model with an 8k context whose end-of-text token's (tied) embedding is zero, so its
    logit is 0 and greedy decoding never ends early: a generation long enough to hang up in."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_llama

    out = tmp_path_factory.mktemp("long")
    path = make_tiny_llama(out / "long", tiny_tokenizer_dir, layers=4, hidden=256, max_positions=8192)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.eos_token_id] = 0
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def long_onnx(long_model):
    from edgekit.export.onnx_export import export_onnx_int4

    return export_onnx_int4(long_model, long_model.parent / "long-int4-onnx")


@pytest.fixture(scope="module")
def long_gguf(long_model):
    from edgekit.export.gguf_write import write_gguf

    return write_gguf(long_model, long_model.parent / "long-F16.gguf", "f16")


@pytest.mark.parametrize("how", ["gives up waiting", "gives up on a stream", "hangs up mid-stream"])
def test_a_client_that_disconnects_stops_its_generation(long_gguf, long_onnx, how):
    """The tiny random model's llama.cpp stream holds its pieces back (its bytes are rarely
    whole UTF-8 characters), so mid-stream hang-ups are tested on an ONNX folder."""
    model = long_onnx if how == "hangs up mid-stream" else long_gguf
    with server(model, "--ctx", "4096") as (base, _client):
        if how == "hangs up mid-stream":  # reads a few pieces, then hangs up
            with httpx.stream("POST", f"{base}/v1/completions", json={**LONG, "stream": True}, timeout=10) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i == 3:
                        break
        else:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{base}/v1/completions", json={**LONG, "stream": how == "gives up on a stream"}, timeout=0.5)
        stopped = wait_idle(base, 3.0)
        h = health(base)
        assert h["cancelled"] == 1 and h["done"] == 0, h  # stopped, not run to the context's end
        small = httpx.post(f"{base}/v1/completions", json={"prompt": "The", "max_tokens": 4}, timeout=10)
        assert small.status_code == 200 and stopped < 3.0


def test_the_server_answers_while_an_onnx_model_generates(long_onnx):
    """onnxruntime-genai holds the GIL for a whole decoding step: in the server's own process
    the event loop got it about once per token, a streamed answer stalled (each of the event
    loop's I/O calls cost a token's time) and the server neither answered nor saw a hang-up until
    the generation reached the end of its context. The model runs in a child process instead."""
    with server(long_onnx, "--ctx", "4096") as (base, _client):
        with httpx.stream("POST", f"{base}/v1/completions", json={**LONG, "stream": True}, timeout=10) as r:
            lines = r.iter_lines()
            next(lines)
            for _ in range(5):
                t0 = time.monotonic()
                assert health(base)["generating"] and time.monotonic() - t0 < 1.0
                next(lines)
        wait_idle(base, 3.0)
        assert health(base)["cancelled"] == 1


def test_a_model_process_that_dies_fails_its_request_and_is_started_again(long_gguf):
    import os
    import signal
    import threading

    procs = []
    with server(long_gguf, "--ctx", "4096", procs=procs) as (base, _client):
        answers = []
        thread = threading.Thread(target=lambda: answers.append(httpx.post(f"{base}/v1/completions", json=LONG,
                                                                            timeout=30)))
        thread.start()
        wait_until(lambda: health(base)["generating"], 10.0)
        pid = procs[0].pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        child = next(int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())
        os.kill(child, signal.SIGKILL)
        thread.join()
        assert answers[0].status_code == 500 and "model process died" in answers[0].json()["error"]["message"]
        again = httpx.post(f"{base}/v1/completions", json={"prompt": "The", "max_tokens": 4}, timeout=60)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
        assert health(base)["failed"] == 1


def test_a_full_queue_is_a_503_with_retry_after_and_requests_are_served_in_order(long_gguf):
    """On a model that cannot end early, so the first request is still generating."""
    with server(long_gguf, "--ctx", "4096", "--queue", "1") as (base, _client):
        import concurrent.futures as cf

        def post(body):
            return httpx.post(f"{base}/v1/completions", json=body, timeout=60)

        with cf.ThreadPoolExecutor(4) as pool:
            first = pool.submit(post, {**LONG, "max_tokens": 3000})
            time.sleep(0.3)
            second = pool.submit(post, {"prompt": "The", "max_tokens": 2})
            time.sleep(0.3)
            third = post({"prompt": "The", "max_tokens": 2})
            assert third.status_code == 503 and third.headers["retry-after"] == "5"
            assert "queue is full" in third.json()["error"]["message"]
            assert first.result().status_code == 200 and second.result().status_code == 200


def test_a_request_past_its_time_limit_is_cut_to_what_it_has(long_gguf):
    """On a model that cannot end early (a trained tiny model may say end-of-text within the limit)."""
    with server(long_gguf, "--ctx", "4096", "--timeout", "0.5") as (base, _client):
        t0 = time.monotonic()
        r = httpx.post(f"{base}/v1/completions", json=LONG, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        assert time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_within_2_s_during_a_generation(bundle, sig):
    import signal
    import threading

    procs = []
    with server(bundle / "tiny-F16.gguf", "--ctx", "4096", procs=procs) as (base, _client):
        got = {}
        t = threading.Thread(target=lambda: got.update(r=httpx.post(f"{base}/v1/completions", json=LONG, timeout=30)))
        t.start()
        while not health(base)["generating"]:
            time.sleep(0.02)
        t0 = time.monotonic()
        procs[0].send_signal(getattr(signal, sig))
        procs[0].wait(timeout=10)
        assert time.monotonic() - t0 < 2.0
        t.join(timeout=10)
        assert got["r"].status_code == 503 and "shutting down" in got["r"].json()["error"]["message"]


def test_api_key_body_limit_and_binding(bundle):
    with server(bundle / "tiny-F16.gguf", "--api-key", "s3cret") as (base, _client):
        assert httpx.get(f"{base}/v1/models").status_code == 401
        ok = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in ok.models.list()] == ["tiny-F16.gguf"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        big = httpx.post(f"{base}/v1/completions", content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}',
                         headers={"Authorization": "Bearer s3cret", "Content-Type": "application/json"}, timeout=30)
        assert big.status_code == 413
        chunked = httpx.post(f"{base}/v1/completions", content=iter([b"x" * (1 << 19)] * 4),
                             headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert chunked.status_code == 413
    proc = subprocess.run([sys.executable, "-m", "edgekit.cli", "serve", str(bundle / "tiny-F16.gguf"), "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--api-key" in proc.stderr and "Traceback" not in proc.stderr


def test_the_load_benchmark_holds_for_a_few_seconds(bundle, tmp_path):
    """benchmarks/serve_load.py, bounded to seconds: every kind of request was sent, normal
    ones answered, abusive ones refused with 4xx, no 5xx, and the server still healthy."""
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "benchmarks/serve_load.py", "--model", str(bundle / "tiny-F16.gguf"),
                           "--clients", "4", "--seconds", "4", "--ctx", "512", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["http_5xx"] == 0 and r["requests"] >= 20, r
    assert r["by_kind"]["prompt_too_long"].get("http_400", 0) >= 1 or not r["by_kind"]["prompt_too_long"], r
    assert set(r["errors_by_kind"]) <= {"http_400"}, r  # refusals only: no transport failure, no 5xx
    assert r["server_stats"]["failed"] == 0, r
