"""The one format table (edgekit.formats): every name a recipe accepts runs.

Each quantized mix goes through llama.cpp's own quantizer and loads in llama.cpp; each mix
QAT/GPTQ can target ("exact") is also written by edgekit's exact quantizers from llama.cpp's
per-tensor plan, and those bytes equal llama.cpp's own file tensor for tensor.
"""

import gguf
import numpy as np
import pytest

from edgekit.formats import EXACT_MIXES, EXACT_TYPES, EXPORT_FORMATS, MIXES, QUANT_MIXES


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, tiny_tokenizer_dir):
    """256-wide, so the K-quant mixes get real Q4_K / Q5_K / Q6_K tensors."""
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("fmt") / "wide", tiny_tokenizer_dir, layers=2, hidden=256)


@pytest.fixture(scope="module")
def f16(wide_model, tmp_path_factory):
    from edgekit.export.gguf_write import write_gguf

    return write_gguf(wide_model, tmp_path_factory.mktemp("f16") / "wide-F16.gguf", "f16")


def test_the_schema_accepts_exactly_the_table():
    from edgekit.stages import Recipe

    export = Recipe.STAGE_CONFIGS["export"].model_fields["formats"].annotation.__args__[0].__args__
    qat = Recipe.STAGE_CONFIGS["qat"].model_fields["mix"].annotation.__args__
    assert set(export) == set(EXPORT_FORMATS) and set(qat) == set(EXACT_MIXES)
    assert set(EXACT_MIXES) <= set(QUANT_MIXES) and all(MIXES[m].label in MIXES[m].file_type for m in MIXES)


@pytest.mark.parametrize("fmt", QUANT_MIXES)
def test_every_mix_quantizes_and_runs_in_llama_cpp(fmt, f16, tmp_path):
    import llama_cpp

    from edgekit.bench.llama_runner import load_llama
    from edgekit.export.llama_quantize import quantize_gguf

    assert hasattr(llama_cpp, MIXES[fmt].llama_ftype)
    out = quantize_gguf(f16, tmp_path / f"wide-{MIXES[fmt].label}.gguf", fmt)
    assert gguf.GGUFReader(out).fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType[MIXES[fmt].file_type]
    llm = load_llama(out, n_ctx=32, logits_all=True)
    llm.eval([1, 2, 3, 4])
    assert np.isfinite(np.asarray(llm.scores[:4])).all()


@pytest.mark.parametrize("fmt", EXACT_MIXES)
def test_every_exact_mix_is_written_bit_for_bit_by_our_quantizers(fmt, wide_model, f16, tmp_path):
    """llama.cpp chooses each tensor's type (fallbacks included); our exact quantizers then
    write the same bytes llama.cpp's quantizer writes, and llama.cpp loads the file."""
    from edgekit.bench.llama_runner import load_llama
    from edgekit.export.gguf_write import write_gguf
    from edgekit.export.llama_quantize import quantize_gguf
    from edgekit.quant.qat import plan_types

    plan = plan_types(wide_model, fmt)
    assert set(plan.values()) <= set(EXACT_TYPES) | {"F16", "F32"}, plan
    ours = write_gguf(wide_model, tmp_path / "ours.gguf", fmt, types=plan)
    theirs = {t.name: t for t in gguf.GGUFReader(quantize_gguf(f16, tmp_path / "theirs.gguf", fmt)).tensors}
    for t in gguf.GGUFReader(ours).tensors:
        assert t.tensor_type == theirs[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data)), t.name
    load_llama(ours, n_ctx=32).eval([1, 2, 3])


def test_a_mix_without_exact_quantizers_is_refused_for_qat(tiny_recipe, capsys):
    from edgekit.cli import main

    inexact = next(m for m in QUANT_MIXES if m not in EXACT_MIXES)
    text = tiny_recipe.read_text().replace("  - {type: export, formats: [f16, q8_0, onnx_int4]}",
                                           f"  - {{type: qat, mix: {inexact}}}\n  - {{type: export, formats: [f16, {inexact}]}}")
    tiny_recipe.write_text(text)
    assert main(["validate", str(tiny_recipe)]) == 2
    assert f"'{inexact}' is not one of" in capsys.readouterr().err


@pytest.mark.parametrize("mix", ["q5_0", "q4_1", "q6_k"])
def test_qat_mixes_beyond_q4_k_m_validate_with_their_export(tiny_recipe, mix):
    from edgekit.cli import main

    text = tiny_recipe.read_text().replace("  - {type: export, formats: [f16, q8_0, onnx_int4]}",
                                           f"  - {{type: qat, mix: {mix}}}\n  - {{type: export, formats: [f16, {mix}]}}")
    tiny_recipe.write_text(text)
    assert main(["validate", str(tiny_recipe)]) == 0
