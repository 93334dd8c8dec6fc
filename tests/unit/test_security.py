"""Untrusted files: no model or data file is ever unpickled; remote code stays off."""

import pickle
import shutil

import pytest

from edgekit.errors import EdgekitError
from edgekit.models.loading import load_causal_lm
from edgekit.models.sources import resolve_model
from edgekit.recipe.schema import ModelSpec, StudentSpec
from edgekit.stages import Recipe


class Payload:
    def __reduce__(self):
        return (shutil.rmtree, ("/definitely/not/here",))  # would run on unpickling


def test_pickle_weights_are_refused(tmp_path, tiny_teacher_dir):
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy2(tiny_teacher_dir / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(EdgekitError, match=r"only pickle weights \(pytorch_model.bin\).*never unpickles"):
        resolve_model(str(d), tmp_path)
    with pytest.raises(EdgekitError, match="never unpickles"):
        load_causal_lm(d)


def test_remote_code_is_off_by_default():
    assert ModelSpec(model="x/y").trust_remote_code is False
    assert StudentSpec().trust_remote_code is False


def test_run_names_cannot_escape_the_runs_directory():
    with pytest.raises(Exception, match="name"):
        Recipe.model_validate({"name": "../../etc", "teacher": {"model": "x/y"}, "data": {"train": "d"},
                               "stages": [{"type": "distill"}]})


def test_hub_ids_use_the_hub_client_and_fail_clearly_offline(tmp_path, monkeypatch):
    from edgekit.models.sources import classify

    assert classify("HuggingFaceTB/SmolLM2-360M-Instruct", tmp_path) == "hub"
    assert classify("embedded:smollm2-135m-instruct", tmp_path) == "embedded"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(EdgekitError, match="could not fetch 'HuggingFaceTB/SmolLM2-360M-Instruct' from the Hugging Face hub"):
        resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct", tmp_path)
