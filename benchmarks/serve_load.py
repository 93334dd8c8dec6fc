"""Load and abuse on `edgekit serve`, loopback only, bounded in time.

    .venv/bin/python benchmarks/serve_load.py                      # SmolLM2-135M-Instruct (embedded), 60 s
    .venv/bin/python benchmarks/serve_load.py --model runs/quickstart/export --seconds 30 --clients 8

N client threads (the real `openai` client, and httpx for what the client cannot send) hammer one
server for a fixed time with a seeded mix of requests: normal chat and completions (whole and
streamed), max_tokens of 100 million (capped by the context), prompts longer than the context
(400), malformed bodies (400), and clients that hang up mid-stream or give up waiting. It records
every outcome by kind, latency and time to first token of the normal requests, how long /health
takes to answer while the clients run (probed every 0.25 s), and the RSS of the server and its
model process before and after. The queue holds twice as many requests as there are clients (a client that
gave up may retry before its abandoned request is noticed, within ~0.2 s), so a 503 here would be a
failure too: the run passes with zero 5xx. Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
KINDS = [("chat", 4), ("chat_stream", 4), ("completion", 2), ("huge_max_tokens", 1), ("prompt_too_long", 1),
         ("malformed", 1), ("hang_up_stream", 1), ("give_up_waiting", 1)]


def rss_mb(pid: int) -> float:
    """Resident memory of the server and its children (the model runs in a child process)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += rss_mb(int(child))
    return total


def probe_health(base: str, stop_at: float, latencies: list[float]) -> None:
    """GET /health every 0.25 s while the clients run: how long the server takes to answer
    anything while it generates (a starved event loop shows here first)."""
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        try:
            httpx.get(f"{base}/health", timeout=30)
            latencies.append(time.monotonic() - t0)
        except httpx.TransportError:
            latencies.append(30.0)
        time.sleep(0.25)


def start_server(model: str, clients: int, ctx: int, max_tokens: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "serve", model, "--port", str(port), "--ctx", str(ctx),
                             "--max-tokens", str(max_tokens), "--queue", str(2 * clients), "--timeout", "60"],
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.3)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"server did not start: {proc.communicate()[1][-2000:]}")


def one_request(kind: str, base: str, client, model_id: str, rng: random.Random) -> dict:
    """Send one request of `kind`; {"outcome", "status", "latency_s", "ttft_s"?}."""
    import openai

    msgs = [{"role": "user", "content": rng.choice(["What is a list?", "Name a prime number.", "Say hello.",
                                                     "What does json.dumps do?"])}]
    t0 = time.perf_counter()
    try:
        if kind in ("chat", "huge_max_tokens"):
            client.chat.completions.create(model=model_id, messages=msgs, max_tokens=16 if kind == "chat" else 100_000_000)
        elif kind == "completion":
            client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=16)
        elif kind == "chat_stream":
            ttft = None
            for chunk in client.chat.completions.create(model=model_id, messages=msgs, max_tokens=16, stream=True):
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.perf_counter() - t0
            return {"outcome": "ok", "status": 200, "latency_s": time.perf_counter() - t0, "ttft_s": ttft}
        elif kind == "prompt_too_long":
            client.completions.create(model=model_id, prompt="lorem ipsum " * 4000, max_tokens=4)
        elif kind == "malformed":
            r = httpx.post(f"{base}/v1/chat/completions", content=b'{"messages": [', timeout=30,
                           headers={"Content-Type": "application/json"})
            return {"outcome": f"http_{r.status_code}", "status": r.status_code, "latency_s": time.perf_counter() - t0}
        elif kind == "hang_up_stream":
            with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=30,
                              json={"messages": msgs, "max_tokens": 200, "stream": True}) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i == 2:
                        break
            return {"outcome": "hung_up" if r.status_code == 200 else f"http_{r.status_code}", "status": r.status_code,
                    "latency_s": time.perf_counter() - t0}
        elif kind == "give_up_waiting":
            try:
                r = httpx.post(f"{base}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 200}, timeout=0.2)
                return {"outcome": "ok" if r.status_code == 200 else f"http_{r.status_code}", "status": r.status_code,
                        "latency_s": time.perf_counter() - t0}
            except httpx.TimeoutException:
                return {"outcome": "gave_up", "status": None, "latency_s": time.perf_counter() - t0}
        return {"outcome": "ok", "status": 200, "latency_s": time.perf_counter() - t0}
    except openai.APIStatusError as e:
        return {"outcome": f"http_{e.status_code}", "status": e.status_code, "latency_s": time.perf_counter() - t0}
    except (openai.APIConnectionError, httpx.TransportError) as e:
        return {"outcome": f"transport_{type(e).__name__}", "status": None, "latency_s": time.perf_counter() - t0}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 1)


def run(model: str, clients: int, seconds: float, ctx: int, seed: int) -> dict:
    import openai

    proc, base = start_server(model, clients, ctx, 32)
    try:
        model_id = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        one_request("chat", base, client, model_id, random.Random(0))  # warm up
        rss_before = rss_mb(proc.pid)
        results, lock, stop_at = [], threading.Lock(), time.monotonic() + seconds

        def worker(i: int):
            rng = random.Random(seed * 1000 + i)
            names, weights = zip(*KINDS)
            while time.monotonic() < stop_at:
                kind = rng.choices(names, weights)[0]
                r = one_request(kind, base, client, model_id, rng) | {"kind": kind}
                with lock:
                    results.append(r)

        health_s: list[float] = []
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        threads.append(threading.Thread(target=probe_health, args=(base, stop_at, health_s)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(1.0)  # the last hang-ups' generations stop
        health = httpx.get(f"{base}/health").json()
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    normal = [r for r in results if r["kind"] in ("chat", "chat_stream", "completion") and r["outcome"] == "ok"]
    from edgekit.machine import machine_description

    return {"model": str(model), "clients": clients, "seconds": seconds, "requests": len(results),
            "by_kind": {k: dict(Counter(r["outcome"] for r in results if r["kind"] == k)) for k, _ in KINDS},
            "errors_by_kind": dict(Counter(r["outcome"] for r in results if r["outcome"] not in ("ok", "hung_up", "gave_up"))),
            "http_5xx": sum(1 for r in results if r["status"] and r["status"] >= 500),
            "p50_ms": pct([r["latency_s"] for r in normal], 0.5), "p99_ms": pct([r["latency_s"] for r in normal], 0.99),
            "ttft_p50_ms": pct([r["ttft_s"] for r in normal if r.get("ttft_s")], 0.5),
            "ttft_p99_ms": pct([r["ttft_s"] for r in normal if r.get("ttft_s")], 0.99),
            "health_p50_ms": pct(health_s, 0.5), "health_p99_ms": pct(health_s, 0.99),
            "health_max_ms": pct(health_s, 1.0),
            "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
            "server_stats": {k: v for k, v in health.items() if k not in ("status", "model", "backend")},
            "machine": machine_description()}


def default_model() -> str:
    from edgekit.models.embedded import get_embedded
    from edgekit.models.sources import cache_dir

    return str(get_embedded("smollm2-135m-instruct").gguf_path(cache_dir()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .gguf, ONNX folder or bundle (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args(argv)
    result = run(args.model or default_model(), args.clients, args.seconds, args.ctx, args.seed)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["http_5xx"] == 0 and result["rss_after_mb"] < 1.5 * result["rss_before_mb"] + 50 else 1


if __name__ == "__main__":
    sys.exit(main())
