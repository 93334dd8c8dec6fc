"""`edgekit serve`: a real server process on localhost, spoken to by the real `openai` client."""

import contextlib
import socket
import subprocess
import sys
import time

import httpx
import pytest


openai = pytest.importorskip("openai")


@pytest.fixture
def bundle(tiny_bundle):
    return tiny_bundle


@contextlib.contextmanager
def server(model_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "serve", str(model_path), "--port", str(port),
                             "--max-tokens", "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
