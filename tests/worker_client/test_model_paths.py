"""LoadModel options the agent derives from `--models-path`."""

from __future__ import annotations

from pathlib import Path

from worker_client._generated import backend_pb2
from worker_client.agent.supervisor import with_model_paths

MODELS = Path("/srv/models")


def test_relative_model_is_joined_to_the_models_path() -> None:
    options = with_model_paths(backend_pb2.ModelOptions(Model="llama/q4.gguf", ContextSize=4096), MODELS)
    assert (options.ModelPath, options.ModelFile) == ("/srv/models", "/srv/models/llama/q4.gguf")
    assert options.ContextSize == 4096


def test_absolute_paths_uris_and_explicit_fields_are_kept() -> None:
    assert (
        with_model_paths(backend_pb2.ModelOptions(Model="/data/m.gguf"), MODELS).ModelFile == "/data/m.gguf"
    )
    assert with_model_paths(backend_pb2.ModelOptions(Model="hf://org/m"), MODELS).ModelFile == ""
    explicit = backend_pb2.ModelOptions(Model="m", ModelFile="/x/m", ModelPath="/x")
    assert with_model_paths(explicit, MODELS) == explicit
