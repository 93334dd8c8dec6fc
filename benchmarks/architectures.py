"""Bring-your-own-architecture matrix: tiny random models of each model type through edgekit.

    .venv/bin/python benchmarks/architectures.py                   # every architecture below
    .venv/bin/python benchmarks/architectures.py --arch qwen3 --arch phi3 --out /tmp/a.json

For each architecture a tiny random transformers model (4 layers, width 256, 1,200 positions)
with a byte-level BPE tokenizer trained here (or a SentencePiece byte-fallback one where
llama.cpp's converter requires tokenizer.model), then:
- distill: a 2-layer student copied from its layers trains 2 KD steps (finite loss);
- gguf_f16: our F16 GGUF (llama.cpp's converter + edgekit's listed metadata fixes) loads and runs;
  our F32 GGUF in llama.cpp against transformers (fp32) on 1,024 tokens: KL per position range
  [0,32) [32,128) [128,512) [512,1024), the max reported (kl_vs_transformers_max: the conversion
  itself, rope scaling and sliding windows included, without fp16's rounding); our F16 file
  against the converter's own F16 (kl_vs_converter_max: nonzero only where a listed fix
  changes the computation);
- tokens_equal: llama.cpp tokenizes a mixed text (code, numbers, unicode, chat turns) as
  transformers does; chat_template_equal: llama.cpp's llama_chat_apply_template renders the
  chat as apply_chat_template does; eos/bos ids equal config.json's;
- qat: llama.cpp's Q4_K_M plan read back, fake-quantized, 2 QAT steps; gguf_q4_k_m: the QAT
  grid written into Q4_K_M, equal byte for byte to llama.cpp's quantization of the latent
  weights, and loaded and run by llama.cpp;
- onnx_int4: onnxruntime-genai's builder exports it, ORT tokenizes as transformers does, and the
  same graph built at fp32 gives transformers' logits on 512 tokens (onnx_fp32_kl_vs_transformers_max
  <= 1e-4; the int4 folder's KL and top-1 agreement beside it), or "unsupported by the builder".
Writes benchmarks/results/architectures.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
RANGES = [(0, 32), (32, 128), (128, 512), (512, 1024)]
COMMON = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=1200, initializer_range=0.1)
ARCHS = {  # name: (config class, extra config, tokenizer kind)
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128}), "bpe"),
    "mistral": ("MistralConfig", dict(sliding_window=None), "bpe"),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True), "bpe"),
    "qwen3": ("Qwen3Config", dict(head_dim=64, tie_word_embeddings=True), "bpe"),
    "gemma2": ("Gemma2Config", dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=128,
                                    final_logit_softcapping=30.0, attn_logit_softcapping=50.0), "spm"),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=128,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                          "full_attention"]), "bpe"),
    "phi3": ("Phi3Config", dict(original_max_position_embeddings=1200, pad_token_id=0), "spm"),  # as Phi-3-mini ships
    "granite": ("GraniteConfig", dict(embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0,
                                      attention_multiplier=0.125), "bpe"),
    "olmo2": ("Olmo2Config", dict(), "bpe"),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 1, 1, 0], pad_token_id=0), "bpe"),  # llama.cpp's fixed pattern
}
# Phi-3's vocabulary has these; llama.cpp's vocabulary loader looks them up by name for a model
# named phi3 and cannot load one without them
SPM_SYMBOLS = {"phi3": ("<|endoftext|>", "<|end|>")}


def corpus(n: int = 60) -> list[str]:
    return [json.loads(line)["text"] for line in (REPO / "recipes/data/stdlib_docs.jsonl").read_text().splitlines()[:n]]


def bpe_tokenizer(out: Path) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=512, min_frequency=2, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "</s>", "<|end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def spm_tokenizer(out: Path, dummy_prefix: bool = True, symbols: tuple[str, ...] = ()) -> Path:
    """A SentencePiece BPE model with byte fallback (tokenizer.model), as Llama-2 / Gemma / Phi-3 ship;
    Gemma's has no dummy prefix (no space put before the text; llama.cpp's converter writes it so).
    `symbols`: more special tokens the family's vocabulary has (llama.cpp looks Phi-3's up by name)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    text = out / "corpus.txt"
    text.write_text("\n".join(corpus()))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out / "tokenizer"), vocab_size=600, model_type="bpe",
                                   byte_fallback=True, user_defined_symbols=["<|im_start|>", "<|im_end|>", *symbols],
                                   add_dummy_prefix=dummy_prefix, split_digits=True,  # as the three families' do
                                   character_coverage=1.0, minloglevel=2)
    text.unlink()
    (out / "tokenizer.vocab").unlink()
    # transformers 5 builds the fast tokenizer from tokenizer.model when loading a directory
    # (LlamaTokenizer(vocab_file=...) gives an empty 3-token vocabulary); tokenizer.model stays
    # (Gemma's class builds it without the "▁" Llama's puts before the text, as its tokenizer.model says)
    family = "LlamaTokenizer" if dummy_prefix else "GemmaTokenizer"
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": family, "legacy": False, "add_bos_token": False,
                                                           "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def make_model(arch: str, tok_dir: Path, out: Path) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cls, extra, _ = ARCHS[arch]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = getattr(transformers, cls)(**{**COMMON, **extra, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                                        "bos_token_id": tok.bos_token_id})
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms away from their init, so a missing shift or scale would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0, 0.3) if "norm" in name and arch.startswith("gemma") else p.uniform_(0.7, 1.3)
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        shutil.copy2(f, out / f.name)
    # a generic fast tokenizer (transformers 5 would otherwise force some families' own pre-tokenizer
    # by model type); Phi-3's converter reads a GPT-2 style tokenizer only as Phi-4-mini declares it
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "GPT2Tokenizer" if arch == "phi3" and ARCHS[arch][2] == "bpe" else "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    from edgekit.bench.llama_runner import load_llama

    llm = load_llama(path, n_ctx=1280, logits_all=True)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def kl_by_range(p_logits: np.ndarray, q_logits: np.ndarray) -> dict:
    """KL(p || q) per position range, p the reference."""
    v = min(p_logits.shape[1], q_logits.shape[1])
    lp = torch.log_softmax(torch.tensor(p_logits[:, :v]), -1)
    lq = torch.log_softmax(torch.tensor(q_logits[:, :v]), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {f"{a}-{b}": float(kl[a:b].mean()) for a, b in RANGES}


def chat_template_equal(gguf_path: Path, tok) -> bool:
    """llama.cpp's own template engine (llama_chat_apply_template) against apply_chat_template."""
    import ctypes

    import llama_cpp

    from edgekit.formats.gguf_read import read_metadata

    tmpl = read_metadata(gguf_path).get("tokenizer.chat_template")
    msgs = [("system", "Be brief."), ("user", "What is a list?"), ("assistant", "A sequence."), ("user", "And a dict?")]
    chat = (llama_cpp.llama_chat_message * len(msgs))(*[llama_cpp.llama_chat_message(r.encode(), c.encode()) for r, c in msgs])
    buf = ctypes.create_string_buffer(8192)
    n = llama_cpp.llama_chat_apply_template(tmpl.encode() if tmpl else None, chat, len(msgs), True, buf, len(buf))
    theirs = buf.raw[:n].decode() if n > 0 else None
    ours = tok.apply_chat_template([{"role": r, "content": c} for r, c in msgs], tokenize=False, add_generation_prompt=True)
    return theirs == ours


def sample_ids(tok, n: int = 1024) -> list[int]:
    ids = []
    for text in corpus(90):
        ids += tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit("corpus too short")


def distill_works(model, tok_dir: Path, ids: list[int], work: Path) -> bool:
    from edgekit.distill.trainer import KDSettings, train
    from edgekit.models.student import init_from_teacher_layers

    student = init_from_teacher_layers(model, [0, 3])
    rows = torch.tensor(ids[:4 * 64]).reshape(4, 64)
    last = train(student, model, rows, KDSettings(steps=2, batch_size=2, loss_chunk=32, warmup_steps=1), work / "distill")
    return bool(np.isfinite(last["loss"]))


def qat_into_q4_k_m(model_dir: Path, ids: list[int], work: Path) -> tuple[bool, bool]:
    """(QAT trained on llama.cpp's Q4_K_M plan, the file holds exactly that grid and runs)."""
    import gguf

    from edgekit.distill.trainer import KDSettings, train
    from edgekit.export.gguf_write import write_gguf
    from edgekit.export.llama_quantize import quantize_gguf
    from edgekit.models.loading import load_causal_lm, save_model
    from edgekit.quant.qat import plan_types, prepare, strip

    plan = plan_types(model_dir, "q4_k_m")
    student, teacher = load_causal_lm(model_dir), load_causal_lm(model_dir)
    coverage = prepare(student, plan)
    rows = torch.tensor(ids[:4 * 64]).reshape(4, 64)
    last = train(student, teacher, rows, KDSettings(steps=2, batch_size=2, loss_chunk=32, warmup_steps=1, lr=1e-3),
                 work / "qat")
    strip(student)
    save_model(student, model_dir, work / "qat-model")
    ours = write_gguf(work / "qat-model", work / "qat-Q4_K_M.gguf", "q4_k_m", types=plan)
    theirs = quantize_gguf(write_gguf(work / "qat-model", work / "qat-F16.gguf", "f16"), work / "llama-Q4_K_M.gguf", "q4_k_m")
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    same = sorted(a) == sorted(b) and all(a[k].tensor_type == b[k].tensor_type and np.array_equal(a[k].data, b[k].data) for k in a)
    runs = bool(np.isfinite(llama_logits(ours, ids[:64])).all())
    return bool(np.isfinite(last["loss"]) and coverage["fake_quantized"]), bool(same and runs)


def onnx_int4(model_dir: Path, ids: list[int], hf: np.ndarray, work: Path) -> dict:
    """The builder's folders in ONNX Runtime against transformers (fp32) on 512 tokens: ✅ when its
    tokenizer gives the model's ids (the export checks it) and the same graph built at fp32 gives
    transformers' logits (KL <= 1e-4, as for the GGUF); the int4 folder's own KL and top-1
    agreement are reported beside it (int4 error on a random model, not a conversion error)."""
    from transformers import AutoConfig

    from edgekit.bench.ort_runner import ort_scorer
    from edgekit.errors import EdgekitError
    from edgekit.export.onnx_export import builder_architectures, export_onnx_int4
    from edgekit.stages.support import architecture

    arch = architecture(AutoConfig.from_pretrained(model_dir))
    if arch not in builder_architectures():
        return {"onnx_int4": "unsupported by the builder"}
    try:
        int4 = export_onnx_int4(model_dir, work / "onnx")
        fp32 = export_onnx_int4(model_dir, work / "onnx-fp32", precision="fp32")
    except EdgekitError as e:
        return {"onnx_int4": f"failed: {str(e)[:200]}"}
    n = 512
    exact, quantized = (ort_scorer(f)(torch.tensor(ids[:n])).double().numpy() for f in (fp32, int4))
    kl_fp32, kl_int4 = (max(list(kl_by_range(hf[:n], x).values())[:3]) for x in (exact, quantized))  # ranges up to 512
    top1 = float((quantized.argmax(-1) == hf[:n, :quantized.shape[1]].argmax(-1)).mean())
    return {"onnx_int4": kl_fp32 <= 1e-4, "onnx_fp32_kl_vs_transformers_max": kl_fp32,
            "onnx_int4_kl_vs_transformers_max": kl_int4, "onnx_int4_top1_agreement": round(top1, 3)}


def check(arch: str, work: Path) -> dict:
    from transformers import AutoTokenizer

    from edgekit.errors import EdgekitError
    from edgekit.export.converter import check_tokenization, convert
    from edgekit.export.gguf_write import write_gguf
    from edgekit.formats.gguf_read import read_metadata
    from edgekit.models.loading import load_causal_lm

    t0 = time.perf_counter()
    kind = ARCHS[arch][2]
    tok_dir = (spm_tokenizer(work / "tok", not arch.startswith("gemma"), SPM_SYMBOLS.get(arch, ())) if kind == "spm"
               else bpe_tokenizer(work / "tok"))
    model_dir = make_model(arch, tok_dir, work / arch)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = sample_ids(tok)
    model = load_causal_lm(model_dir)
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    p = torch.softmax(torch.tensor(hf), -1)
    row = {"arch": arch, "tokenizer": "SentencePiece byte-fallback" if kind == "spm" else "byte-level BPE",
           "mean_entropy_nats": round(float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean()), 3),
           "distill": distill_works(model, tok_dir, ids, work)}
    f16 = write_gguf(model_dir, work / "F16.gguf", "f16")
    f32 = write_gguf(model_dir, work / "F32.gguf", "f32")  # the computation itself, without fp16 rounding
    raw = convert(model_dir, work / "converter-F16.gguf", "f16")
    row["gguf_f16"] = bool(np.isfinite(llama_logits(f16, ids[:64])).all())
    row["kl_vs_transformers"] = kl_by_range(hf, llama_logits(f32, ids))
    row["kl_vs_transformers_max"] = max(row["kl_vs_transformers"].values())
    row["kl_vs_converter"] = kl_by_range(llama_logits(raw, ids), llama_logits(f16, ids))
    row["kl_vs_converter_max"] = max(row["kl_vs_converter"].values())
    try:
        check_tokenization(model_dir, f16, "tokenizer")
        row["tokens_equal"] = True
    except EdgekitError:
        row["tokens_equal"] = False
    row["chat_template_equal"] = chat_template_equal(f16, tok)
    meta, cfg = read_metadata(f16), json.loads((model_dir / "config.json").read_text())
    row["eos_bos_equal"] = (meta.get("tokenizer.ggml.eos_token_id") == cfg.get("eos_token_id")
                            and meta.get("tokenizer.ggml.bos_token_id") == cfg.get("bos_token_id"))
    row["qat"], row["gguf_q4_k_m"] = qat_into_q4_k_m(model_dir, ids, work)
    row.update(onnx_int4(model_dir, ids, hf, work))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=list(ARCHS), help="repeatable; default: all")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "architectures.json"))
    args = ap.parse_args(argv)
    from edgekit.machine import machine_description

    rows = []
    for arch in args.arch or list(ARCHS):
        with tempfile.TemporaryDirectory(prefix=f"arch-{arch}-") as tmp:
            try:
                row = check(arch, Path(tmp))
            except Exception as e:  # noqa: BLE001  one architecture's failure is a row, not the end of the matrix
                row = {"arch": arch, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps({"rows": rows, "machine": machine_description()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
