"""``--spinning auto``: a model spins only when it is alone in its repository, and an
open-vocabulary classifier's own ``<name>_text`` beside it does not count as another model.

Two halves: the export writes the setting into both configs (export/model_config.py, through
the open-vocabulary plan), and the local backend's rule reads a repository's models so
(serve/stack/triton_backend/onnxruntime/model.py, loaded here with a stand-in for Triton's
``triton_python_backend_utils``; no Triton is started).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from cliplora.core import contract
from cliplora.export.model_config import model_config
from cliplora.export.open_vocabulary import plan_open_vocabulary
from cliplora.export.options import ExportOptions
from tests import factories

BACKEND = Path(__file__).parents[1] / "serve" / "stack" / "triton_backend" / "onnxruntime" / "model.py"


@pytest.fixture()
def backend(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("cliplora_test_backend", BACKEND)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _repository(root: Path, models: list[str]) -> Path:
    for name in models:
        (root / name / "1").mkdir(parents=True)
        (root / name / contract.CONFIG_FILENAME).write_text(f'name: "{name}"\n')
    (root / "half-made").mkdir()  # a folder without config.pbtxt is no model
    return root


@pytest.mark.parametrize(("models", "spins"), [
    (["pets"], "on"),
    (["pets", "pets_text"], "on"),  # the classifier and its own text encoder: still alone
    (["pets", "pets_text", "cars"], "off"),  # another classifier
    (["pets", "cars_text"], "off"),  # cars_text without a cars is a classifier of its own
    (["pets", "pets_text", "cars", "cars_text"], "off"),
])
def test_auto_counts_a_classifier_and_its_text_encoder_as_one(backend, tmp_path, models, spins) -> None:
    root = _repository(tmp_path / "repo", models)
    assert backend._spinning("auto", str(root / models[0])) == spins
    assert backend._spinning("on", str(root / models[0])) == "on"
    assert backend._spinning("off", str(root / models[0])) == "off"


def test_the_export_writes_the_setting_for_both_models(tiny_base, tmp_path) -> None:
    classes = ["cat", "dog"]
    options = ExportOptions(model="tiny", pretrained=None, lora="none", classes=tmp_path / "unused.txt",
                            templates=("a photo of a {}.",), name="pets", repository=tmp_path / "repo",
                            open_vocabulary=True, spinning="auto")
    plan = plan_open_vocabulary(options, tiny_base, classes, list(options.templates))
    assert plan is not None and plan.text_model == "pets_text"
    assert plan.config.parameters[contract.PARAM_SPINNING].string_value == "auto"
    spec = contract.TensorSpec(image_size=factories.IMAGE_SIZE, num_classes=2, embedding_dim=tiny_base.embedding_dim)
    classifier = model_config("pets", spec, "fp32", 32, "portable", plan.parameters, options.runtime)
    assert classifier.parameters[contract.PARAM_SPINNING].string_value == "auto"
    unset = ExportOptions(**{**options.__dict__, "spinning": None})
    plan = plan_open_vocabulary(unset, tiny_base, classes, list(options.templates))
    assert contract.PARAM_SPINNING not in plan.config.parameters  # unset: the backend's default (off)
