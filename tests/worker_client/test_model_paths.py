"""LoadModel options the agent derives from `--models-path`, and the paths it refuses (`--allowed-model-roots`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_client._generated import backend_pb2
from worker_client.agent.supervisor import ModelPathRefused, with_model_paths


@pytest.fixture
def models(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    return tmp_path / "models"


def options(**fields) -> backend_pb2.ModelOptions:
    return backend_pb2.ModelOptions(**fields)


def test_relative_model_is_joined_to_the_models_path(models: Path) -> None:
    resolved = with_model_paths(options(Model="llama/q4.gguf", ContextSize=4096), models)
    assert (resolved.ModelPath, resolved.ModelFile) == (str(models), str(models / "llama/q4.gguf"))
    assert resolved.ContextSize == 4096


@pytest.mark.parametrize(
    "model",
    ["echo-1", "sentence-transformers/all-MiniLM-L6-v2", "a/../b.gguf", "huggingface://org/m/q4.gguf"],
)
def test_names_ids_and_uris_pass(models: Path, model: str) -> None:
    resolved = with_model_paths(options(Model=model), models)
    assert resolved.Model == model
    assert resolved.ModelFile == ("" if "://" in model else str(models / model))


def test_empty_model_passes(models: Path) -> None:
    assert with_model_paths(options(), models).ModelPath == str(models)


def test_explicit_paths_inside_the_roots_are_kept(models: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    explicit = options(Model="m", ModelFile=str(shared / "m.gguf"), ModelPath=str(shared))
    assert with_model_paths(explicit, models, [shared]) == explicit
    relative = with_model_paths(options(Model="m", ModelFile="sub/m.gguf"), models)
    assert relative.ModelFile == str(models / "sub/m.gguf")


def test_a_symlink_to_another_allowed_root_passes(models: Path, tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (models / "big.gguf").symlink_to(tmp_path / "shared" / "big.gguf")
    assert with_model_paths(options(Model="big.gguf"), models, [tmp_path / "shared"]).Model == "big.gguf"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"Model": "../../etc/passwd"}, "Model '../../etc/passwd'"),
        ({"Model": "/etc/passwd"}, "Model '/etc/passwd'"),
        ({"Model": "m", "ModelFile": "/etc/passwd"}, "ModelFile '/etc/passwd'"),
        ({"Model": "m", "ModelFile": "../secret.gguf"}, "ModelFile '../secret.gguf'"),
        ({"Model": "m", "ModelPath": "/etc"}, "ModelPath '/etc'"),
        ({"Model": "escape/passwd"}, "Model 'escape/passwd'"),  # a symlink out of the models path
        ({"Model": "escape.gguf"}, "Model 'escape.gguf'"),
        ({"Model": "m\x00.gguf"}, "Model 'm\\x00.gguf'"),
    ],
)
def test_paths_outside_the_roots_are_refused_naming_path_and_roots(
    models: Path, tmp_path: Path, fields: dict, named: str
) -> None:
    (models / "escape").symlink_to("/etc")
    (models / "escape.gguf").symlink_to("/etc/passwd")
    shared = tmp_path / "shared"
    with pytest.raises(ModelPathRefused) as refused:
        with_model_paths(options(**fields), models, [shared])
    message = str(refused.value)
    assert named in message
    if "\x00" not in fields["Model"]:
        assert f"outside the allowed model roots ({models}, {shared})" in message
