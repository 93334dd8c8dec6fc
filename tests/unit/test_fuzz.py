"""Fuzzing (hypothesis, bounded): the recipe loader and the GGUF / safetensors / ONNX
inspectors either succeed or raise EdgekitError (the clean one-line error); never another
exception."""

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekit.errors import EdgekitError

BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
REPO = Path(__file__).resolve().parents[2]
QUICKSTART = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["distill", "qat", "export", "f16", "q4_k_m", "embedded:x"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)


def mutate(tree, path: list, value):
    """Replace (or add) the value at `path` inside a copy of a recipe tree."""
    import copy

    tree = copy.deepcopy(tree)
    node = tree
    for i, key in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, dict):
            k = key if isinstance(key, str) else sorted(node, key=str)[key % len(node)] if node else "x"
            if last or not isinstance(node.get(k), (dict, list)):
                node[k] = value
                return tree
            node = node[k]
        elif isinstance(node, list) and node:
            j = key % len(node) if isinstance(key, int) else 0
            if last or not isinstance(node[j], (dict, list)):
                node[j] = value
                return tree
            node = node[j]
    return tree


def load_text(tmp_path: Path, text: str):
    from edgekit.stages import load_recipe

    p = tmp_path / "fuzz.yaml"
    p.write_text(text)
    try:
        load_recipe(p)
    except EdgekitError:
        pass


@BOUNDED
@given(st.lists(st.one_of(st.integers(0, 20), st.sampled_from(["stages", "data", "teacher", "student", "name", "type"])),
                min_size=1, max_size=4), values)
def test_recipe_loader_mutated_quickstart(tmp_path_factory, path, value):
    tree = mutate(QUICKSTART, path, value)
    load_text(tmp_path_factory.mktemp("r"), yaml.safe_dump(tree, allow_unicode=True))


@BOUNDED
@given(st.text(max_size=300))
def test_recipe_loader_arbitrary_text(tmp_path_factory, text):
    load_text(tmp_path_factory.mktemp("r"), text)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory, tiny_teacher_dir) -> bytes:
    from edgekit.export.gguf_write import write_gguf

    return write_gguf(tiny_teacher_dir, tmp_path_factory.mktemp("g") / "t-F16.gguf", "f16").read_bytes()


@BOUNDED
@given(st.integers(0, 4000), st.binary(min_size=1, max_size=16), st.integers(8, 400_000))
def test_gguf_inspector_on_corrupted_files(tmp_path_factory, gguf_bytes, offset, patch, cut):
    from edgekit.formats.gguf_read import read_metadata, tensor_table

    data = bytearray(gguf_bytes[:cut])
    data[offset:offset + len(patch)] = patch
    p = tmp_path_factory.mktemp("g") / "fuzz.gguf"
    p.write_bytes(bytes(data))
    try:
        read_metadata(p)
        tensor_table(p)
    except EdgekitError:
        pass


@BOUNDED
@given(st.binary(max_size=200), st.sampled_from([".safetensors", ".onnx"]))
def test_safetensors_and_onnx_inspectors_on_random_bytes(tmp_path_factory, data, suffix):
    from edgekit.export.inspect_files import inspect_onnx, inspect_safetensors

    p = tmp_path_factory.mktemp("f") / f"fuzz{suffix}"
    p.write_bytes(data)
    try:
        (inspect_safetensors if suffix == ".safetensors" else inspect_onnx)(p)
    except EdgekitError:
        pass
