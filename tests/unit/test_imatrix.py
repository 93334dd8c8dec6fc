"""Importance matrices: measured in PyTorch, used by llama.cpp's own quantizer, saved as llama.cpp reads them."""

import subprocess

import numpy as np
import pytest
import torch

from edgekit.formats.gguf_read import tensor_table
from edgekit.export.gguf_write import write_gguf
from edgekit.export.llama_quantize import quantize_gguf
from edgekit.quant.imatrix import collect


def gguf_tensors(path):
    from gguf import GGUFReader, quants

    return {t.name: quants.dequantize(t.data, t.tensor_type).reshape(t.data.shape[0], -1) for t in GGUFReader(path).tensors
            if len(t.shape) == 2}


def test_llama_cpp_weights_columns_by_the_importance_matrix(tiny_teacher_dir, tmp_path):
    """Tell llama.cpp that 8 input channels of every weight matter 10^6 times more than the rest:
    its quantizer must then keep those columns closer to the F16 weights than it does without."""
    f16 = write_gguf(tiny_teacher_dir, tmp_path / "t-F16.gguf", "f16")
    cols = {t["name"]: t["shape"][0] for t in tensor_table(f16) if len(t["shape"]) == 2}
    imatrix = {name: np.where(np.arange(n) < 8, 1e3, 1e-3).astype(np.float32) for name, n in cols.items()}
    plain = gguf_tensors(quantize_gguf(f16, tmp_path / "plain.gguf", "q4_k_m"))
    weighted = gguf_tensors(quantize_gguf(f16, tmp_path / "imatrix.gguf", "q4_k_m", imatrix=imatrix))
    ref = gguf_tensors(f16)
    types = {t["name"]: t["type"] for t in tensor_table(tmp_path / "plain.gguf")}
    used = [k for k in ref if types[k] != "Q8_0"]  # llama.cpp's Q8_0 ignores importance; these widths fall back to Q5_0
    assert len(used) >= 16
    heavy = {k: (np.abs(plain[k] - ref[k])[:, :8].mean(), np.abs(weighted[k] - ref[k])[:, :8].mean()) for k in used}
    assert all(w < p for p, w in heavy.values())  # measured ~20% less error on those columns, every tensor
    assert sum(w for _, w in heavy.values()) < 0.85 * sum(p for p, _ in heavy.values())
    assert all(np.array_equal(plain[k], weighted[k]) for k in ref if types[k] == "Q8_0")


def test_collect_names_every_matmul_and_saves_llama_cpp_format(tiny_teacher_dir, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32)
    rows = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    im = collect(model, tiny_teacher_dir, rows, "docs.jsonl")
    names = {t["name"] for t in tensor_table(write_gguf(tiny_teacher_dir, tmp_path / "t.gguf", "f16"))}
    assert set(im.sums) <= names and "blk.0.attn_q.weight" in im.sums and "token_embd.weight" in im.sums  # tied head
    assert len(im.sums) == 4 * 7 + 1 and im.tokens == 48
    np.testing.assert_array_equal(im.sums["blk.1.attn_q.weight"], im.sums["blk.1.attn_v.weight"])  # one input
    assert (im.means()["blk.0.ffn_down.weight"] > 0).all()

    path = im.save(tmp_path / "t.imatrix.gguf")
    reader = GGUFReader(path)
    fields = {f.name for f in reader.fields.values()}
    assert {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"} <= fields
    tensors = {t.name: t for t in reader.tensors}
    np.testing.assert_allclose(tensors["blk.0.attn_q.weight.in_sum2"].data, im.sums["blk.0.attn_q.weight"], rtol=1e-6)
    assert float(tensors["blk.0.attn_q.weight.counts"].data[0]) == 48


def test_llama_quantize_reads_our_imatrix_file_as_we_pass_it(tiny_teacher_dir, tmp_path):
    """llama.cpp's own command-line quantizer, given our imatrix GGUF, writes the same bytes as our
    in-process call (needs `bash third_party/build_llama_tools.sh`)."""
    from edgekit.bench.llama_bench import llama_bench_bin
    from transformers import AutoModelForCausalLM

    tools = llama_bench_bin()
    if tools is None:
        pytest.skip("llama.cpp's tools are not built (bash third_party/build_llama_tools.sh)")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32)
    rows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    im = collect(model, tiny_teacher_dir, rows, "docs.jsonl")
    f16 = write_gguf(tiny_teacher_dir, tmp_path / "t-F16.gguf", "f16")
    ours = quantize_gguf(f16, tmp_path / "ours.gguf", "q4_k_m", imatrix=im.means())
    subprocess.run([str(tools.parent / "llama-quantize"), "--imatrix", str(im.save(tmp_path / "t.imatrix.gguf")),
                    str(f16), str(tmp_path / "cli.gguf"), "Q4_K_M"], check=True, capture_output=True)
    a, b = gguf_tensors(ours), gguf_tensors(tmp_path / "cli.gguf")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)




def test_llama_bench_prices_a_pass_over_several_tokens_as_speculative_decoding_verifies(tiny_teacher_dir, tmp_path):
    """batch_speeds (benchmarks/speculative.py's ceiling): llama-bench's tokens/s of one pass over
    k tokens at a depth, and the decode speed under k = 1; a pass over 9 tokens gives more tokens
    per second than decoding them one by one (batching is never slower per token) on a real file."""
    from edgekit.bench.llama_bench import batch_speeds, llama_bench_bin

    if llama_bench_bin() is None:
        pytest.skip("llama.cpp's tools are not built (bash third_party/build_llama_tools.sh)")
    gguf = write_gguf(tiny_teacher_dir, tmp_path / "t-F16.gguf", "f16")
    speeds = batch_speeds(gguf, threads=1, batches=[1, 3, 9], depth=16, repeats=3)
    assert set(speeds) == {1, 3, 9} and all(v > 0 for v in speeds.values())
    assert speeds[9] > speeds[1]
