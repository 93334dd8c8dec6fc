"""The run report: report.md (and a self-contained report.html) from the run's artifacts.

`render` reads a `RunView`: the recipe, each finished stage's config, metrics and wall
time by stage type, and the run's provenance; it never loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# the evaluate stage's parity-floor scorers (their names are in its metrics as "floor")
FLOOR = ("student_qat_llama_act", "student_qat_llama_act_fp64")


@dataclass
class RunView:
    recipe: object  # the validated recipe
    finished: dict  # stage type -> its artifact (.config, .metrics, .wall_s)
    machine: str
    teacher: str  # the teacher's file, as the report names it
    run_dir: Path
    config_classes: dict = field(default_factory=dict)  # stage type -> its config class (for defaults)


LABELS = {"teacher": "teacher (PyTorch fp32)", "student_init": "student before KD (PyTorch)",
          "student": "student after KD (PyTorch)",
          "student_sft": "student, plain fine-tuning: same data and steps, no teacher (PyTorch)",
          "student_qat": "student after QAT-KD, fake-quantized (PyTorch)",
          FLOOR[0]: "the same, with llama.cpp's 8-bit activation rounding (PyTorch fp32)",
          FLOOR[1]: "the same in fp64 (floor: only float rounding differs)"}


def _label(name: str) -> str:
    if name == "onnx_int4":
        return "exported ONNX, MatMulNBits (ONNX Runtime)"
    method, _, gguf = name.partition("_gguf_")
    if method in ("gptq", "awq"):
        how = {"gptq": "GPTQ on the GGUF grid", "awq": "AWQ-smoothed, exact quantizers"}[method]
        return f"{method.upper()} {gguf.upper()} GGUF ({how}, llama.cpp)" if gguf else \
            f"{method.upper()} int4 checkpoint (llm-compressor, transformers)"
    if name.startswith("ptq_gguf_"):
        return f"student trained as long without QAT, {name.removeprefix('ptq_gguf_').upper()} GGUF (PTQ baseline, llama.cpp)"
    return LABELS.get(name, f"exported {name.removeprefix('gguf_').upper()} GGUF (llama.cpp)")


def qat_recovery(m: dict, fmt: str) -> dict | None:
    """(ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_FP16), all through llama.cpp on the same holdout."""
    try:
        fp16, ptq, qat = m["ptq_gguf_f16"]["ppl"], m[f"ptq_gguf_{fmt}"]["ppl"], m[f"gguf_{fmt}"]["ppl"]
    except KeyError:
        return None
    return {"ppl_fp16": fp16, "ppl_ptq": ptq, "ppl_qat": qat, "recovery": (ptq - qat) / (ptq - fp16) if ptq != fp16 else None}


def _settings(config: dict, classes: dict) -> str:
    """What the recipe set for a stage (values that differ from the defaults), as one table cell;
    recipe.lock.yaml has every value."""
    fields = classes[config["type"]].model_fields if config.get("type") in classes else {}
    changed = [f"`{k}: {v}`" for k, v in config.items()
               if k != "type" and (k not in fields or fields[k].is_required() or fields[k].get_default(call_default_factory=True) != v)]
    return "<br>".join(changed) or "defaults"


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render(view: RunView, sample: dict) -> str:
    fin = view.finished
    lines = _what_was_done(view)
    lines += _exported_files(fin) + _ptq(fin) + _quality(fin) + _tasks(fin) + _speed(fin)
    if sample:
        lines += ["", "## Sample (greedy, llama.cpp)", "", f"Prompt: `{sample['prompt']}`", ""]
        lines += [f"- {k}: `{v.strip()}`" for k, v in sample["outputs"].items()]
    lines += provenance(view.run_dir)
    lines += ["", "Every figure above, per stage: `manifest.json`; the exact recipe with every default filled in: "
              "`recipe.lock.yaml`.", ""]
    return "\n".join(lines)


def _what_was_done(view: RunView) -> list[str]:
    r, fin = view.recipe, view.finished
    lines = [f"# edgekit run report: {r.name}", "",
             f"Machine: {view.machine}", "",
             "## What was done", "",
             f"- Teacher: `{r.teacher.model}` ({view.teacher})"]
    if "distill" in fin:
        m = fin["distill"].metrics
        c = fin["distill"].config
        lines.append(f"- Student: {m.get('init')} {m.get('kept_layers', '')}, {m['student_params'] / 1e6:.1f}M parameters")
        lines.append(f"- Distillation: {c['loss']} (T={c['temperature']}, alpha_ce={c['alpha_ce']}), {c['steps']} steps x "
                     f"{c['batch_size'] * c['grad_accum']} rows of {r.data.seq_len} tokens = {m['tokens_trained']} tokens; "
                     f"final loss {m['final'].get('loss')}, {m['final'].get('tokens_per_s')} tokens/s")
    lines.append(f"- Data: `{r.data.train}`, split by document into train / holdout")
    lines += ["", _table(["stage", "wall time (s)", "settings (changed from the defaults; all in recipe.lock.yaml)"],
                         [[k, v.wall_s, _settings({"type": k, **v.config}, view.config_classes)] for k, v in fin.items() if k != "report"])]
    return lines


def _exported_files(fin: dict) -> list[str]:
    if "export" not in fin:
        return []
    lines = ["", "## Exported files", "",
              _table(["file", "size (MB)", "tensor types"],
                     [[v["file"], v["size_mb"], ", ".join(f"{t} {n}" for t, n in v["tensor_types"].items())]
                      for v in fin["export"].metrics.values()])]
    return lines


def _ptq(fin: dict) -> list[str]:
    if "quantize" not in fin:
        return []
    q = fin["quantize"].metrics
    arts = {k: v for k, v in q.items() if isinstance(v, dict) and "vs_source" in v}
    lines = ["", "## Post-training quantization (GPTQ / AWQ)", "",
              f"From `{q['source']}`, calibrated on {q['calibration_rows']} train rows. Each artifact runs in its own "
              "runtime and is compared with the float model it came from; a GGUF also with PyTorch computing on "
              "the file's own grid (parity: a packing error would show here).", "",
              _table(["artifact", "format", "runtime", "size (MB)", "time (s)", "KL vs source", "top-1 vs source",
                      "parity KL"],
                     [[v["file"], v["format"], v["runtime"], v["size_mb"], v["seconds"], f"{v['vs_source']['kl']:.4f}",
                       f"{v['vs_source']['top1']:.1%}",
                       f"{v['parity_vs_pytorch_grid']['kl']:.5f}" if "parity_vs_pytorch_grid" in v else "-"]
                      for v in arts.values()])]
    return lines


def _quality(fin: dict) -> list[str]:
    if "evaluate" not in fin:
        return []
    m = fin["evaluate"].metrics
    names = [k for k in m if isinstance(m[k], dict) and "ppl" in m[k]]
    lines = ["", "## Quality on held-out text", "",
              f"{m['holdout_rows']} holdout rows, {m[names[0]]['tokens']} scored tokens. KL is KL(teacher || model) in nats/token.", "",
              _kl_table(m, names)]
    for subset, g in (m.get("general") or {}).items():
        subnames = [k for k in g if isinstance(g[k], dict) and "ppl" in g[k]]
        lines += ["", f"### General text: {subset} ({g[subnames[0]]['tokens']} tokens, never trained on)", "", _kl_table(g, subnames)]
    parity = [[_label(a), _label(b), f"{m[f'{a}|{b}']['kl']:.5f}", f"{m[f'{a}|{b}']['top1']:.1%}"]
              for a, b in m.get("parity_pairs", [])]
    if parity:
        lines += ["", "### Parity: exported files vs the PyTorch model they came from", "",
                  _table(["file", "PyTorch model", "KL (nats/token)", "top-1 agreement"], parity)]
        if m.get("floor"):
            lines += ["", "llama.cpp rounds every quantized matmul's input to 8-bit blocks (Q8_0/Q8_K). The last row "
                      "is the floor: the same grid and rounding computed in fp32 and in fp64 disagree by that much, "
                      "because rounding to 8 bits turns tiny float differences into whole code steps."]
    lines += _qat_recovery(fin, m)
    return lines


def _kl_table(m: dict, names: list[str]) -> str:
    """Perplexity and the KL statistics llama-perplexity reports, each model against the teacher."""
    def kl(n, key, f):
        pair = m.get(f"{n}|teacher")
        return format(pair[key], f) if pair and key in pair else "-"

    return _table(["model", "perplexity", "KL to teacher (mean)", "KL p99", "KL p99.9", "KL max", "same top token"],
                  [[_label(n), f"{m[n]['ppl']:.2f}", kl(n, "kl", ".4f"), kl(n, "kld_p99", ".4f"), kl(n, "kld_p999", ".3f"),
                    kl(n, "kld_max", ".2f"), kl(n, "top1", ".1%")] for n in names])


def _qat_recovery(fin: dict, m: dict) -> list[str]:
    lines = []
    if "qat" in fin:
        rec = qat_recovery(m, fin["qat"].config["mix"])
        q = fin["qat"].metrics
        lines += ["", "### QAT-KD", "",
                  f"Fake-quantized on llama.cpp's exact grid: {q['fake_quantized']}; left in float (no exact "
                  f"quantizer yet): {q['left_in_float']}."]
        if rec and rec["recovery"] is not None:
            lines.append(f"Perplexity through llama.cpp: F16 {rec['ppl_fp16']:.2f}, PTQ {rec['ppl_ptq']:.2f}, "
                         f"QAT-KD {rec['ppl_qat']:.2f}; recovery (PTQ-QAT)/(PTQ-F16) = {rec['recovery']:.0%}.")
    return lines


def _tasks(fin: dict) -> list[str]:
    lines = []
    if "evaluate" in fin and "tasks" in fin["evaluate"].metrics:
        t = fin["evaluate"].metrics["tasks"]
        pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
        first = next(iter(t["models"].values()))
        lines += ["", "## Task accuracy", "",
                  f"`{t['file']}`: {first['mc_items']} multiple-choice items (log-likelihood; acc_norm divides by the "
                  f"answer's length in bytes) and {first['em_items']} exact-match items (greedy), every model on the same "
                  f"token ids in its own runtime." + (f" Chance on the multiple choice: {t['chance']:.1%}." if t["chance"] else ""), "",
                  _table(["model", "accuracy", "acc_norm", "exact match"],
                         [[_label(n), pct(g["acc"]), pct(g["acc_norm"]), pct(g["exact_match"])] for n, g in t["models"].items()])]
    return lines


def _speed(fin: dict) -> list[str]:
    lines = []
    if "bench" in fin:
        rows = fin["bench"].metrics["rows"]
        measured = [x for x in rows if not x.get("predicted")]
        predicted = [x for x in rows if x.get("predicted")]
        lines += ["", "## Speed and memory (measured on this machine)", "",
                  _table(["file", "backend", "target", "threads", "prefill tok/s", "decode tok/s (min-max)", "roofline tok/s",
                          "share of roofline", "TTFT ms", "load s", "peak RSS MB", "size MB"],
                         [[x["file"], x["backend"], x["target"], x["threads"], f"{x['prefill_tps']:.0f}",
                           f"{x['decode_tps']:.1f} ({x['decode_tps_min']:.1f}-{x['decode_tps_max']:.1f})",
                           f"{x['roofline_tps']:.0f}", f"{x['roofline_share']:.0%}" + (" (in cache)" if x.get("cache_resident") else ""),
                           f"{x['ttft_ms']:.0f}", f"{x['load_s']:.2f}", f"{x['peak_rss_mb']:.0f}", f"{x['size_mb']:.1f}"]
                          for x in measured]),
                  "", f"Roofline: memory read bandwidth measured here with the same threads ({measured[0]['bandwidth_gbs'] if measured else '?'} GB/s) "
                  "divided by the weight bytes one decoded token reads. A model that fits in the CPU's last-level cache "
                  "(\"in cache\") is not bound by memory bandwidth and can pass 100%."]
        if predicted:
            lines += ["", "### Predicted for devices not run here (PREDICTIONS, not measurements)", "",
                      _table(["file", "device", "peak bandwidth GB/s", "roofline tok/s", "predicted decode tok/s", "bound"],
                             [[x["file"], x["target"], x["bandwidth_gbs"], f"{x['roofline_tps']:.0f}", f"{x['decode_tps']:.0f}",
                               x.get("bound", "-")] for x in predicted]),
                      "", "Each prediction is the lower of a memory bound (the device's effective decode bandwidth) and a "
                      "compute bound, both calibrated on a published measurement of a real model on that device "
                      "(edgekit/bench/targets.yaml cites each); neither can exceed the device's roofline."]
        emulated = [x for x in fin["bench"].metrics.get("emulated", [])]
        if emulated:
            lines += ["", "### On the devices' ARM kernels (EMULATED: llama.cpp cross-built for aarch64 and ONNX Runtime's "
                      "aarch64 build, run under qemu; arithmetic exact, speed not measured)", "",
                      _table(["file", "device", "kernels", "KL vs x86 (same runtime)", "top-1 vs x86", "KL vs PyTorch",
                              "floor (x86 vs PyTorch)", "perplexity (ARM)", "perplexity (x86)"],
                             [[x["file"], x["target"], x["kernels"], f"{x['kl_vs_x86']:.2e}", f"{x['top1_vs_x86']:.2%}",
                               f"{x['kl_vs_torch']:.2e}" if "kl_vs_torch" in x else "-",
                               f"{x['floor_kl']:.2e}" if "floor_kl" in x else "-", f"{x['ppl']:.3f}", f"{x['ppl_x86']:.3f}"]
                              for x in emulated])]
    return lines


def provenance(run_dir: Path) -> list[str]:
    """The run's inputs (from manifest.json, written after every stage) and package versions."""
    import json

    import yaml

    manifest, lock = run_dir / "manifest.json", run_dir / "recipe.lock.yaml"
    if not manifest.is_file():
        return []
    inputs = json.loads(manifest.read_text()).get("inputs", {})
    t, d = inputs.get("teacher", {}), inputs.get("data", {})
    versions = yaml.safe_load(lock.read_text()).get("versions", {}) if lock.is_file() else {}
    rows = [["teacher", f"`{t.get('file') or t.get('path') or t.get('repo_id', '?')}`" + (f" @ {t['revision']}" if t.get("revision") else "") + (f", sha256 `{t['sha256'][:16]}…`" if t.get("sha256") else "")],
            ["data", f"{d.get('train_documents')} train / {d.get('holdout_documents')} holdout documents; train sha256 "
                     f"`{str(d.get('train_sha256'))[:16]}…`, holdout `{str(d.get('holdout_sha256'))[:16]}…`; holdout 13-gram "
                     f"overlap with train {d.get('holdout_13gram_overlap')}"],
            ["seed", str(inputs.get("seed"))],
            ["versions", ", ".join(f"{k} {v}" for k, v in versions.items())]]
    return ["", "## Provenance", "", _table(["input", "value"], rows)]


def to_html(name: str, markdown_text: str, out: Path) -> str:
    """A self-contained page: the Markdown report rendered, its plots embedded as data URIs."""
    import base64

    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    for png in sorted((out / "plots").glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode()
        body = body.replace(f'src="plots/{png.name}"', f'src="data:image/png;base64,{data}"')
    style = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
             "table{border-collapse:collapse;font-size:.85rem;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem}"
             "th{background:#f3f3f3}img{max-width:100%}code{background:#f5f5f5;padding:0 .2rem}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>edgekit report: {name}</title><style>{style}</style></head><body>{body}</body></html>"
