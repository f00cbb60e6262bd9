"""The manifest an export writes today has the shape, and the stable values, of the manifests
the export of commit 9752bcb wrote (tests/data/manifests: the same tiny model, adapters and
options): the manifest builder (export/manifests.py) changed how it is written, not what."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cliplora.export.pipeline import ExportOptions, run_export
from tests import factories

GOLDEN = Path(__file__).parent / "data" / "manifests"
# Values that differ from run to run (time, hashes of files written now, the environment,
# float figures of a computation) are compared by type only.
STABLE = ("name", "version", "base", "classes", "templates", "precision", "target", "gpu_serving", "tensors")
STABLE_LORA = ("format", "r", "alpha", "scaling", "scale", "updates", "targets", "encoder", "params", "position",
               "use_rslora", "rank_pattern", "alpha_pattern", "base_model_name_or_path")


def _shape(value: object) -> object:
    """The keys all the way down, and the type of every value."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(item) for item in value]
    return type(value).__name__


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_config) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("manifests")
    classes = factories.write_classes(root / "classes.txt")
    common = dict(model=str(tiny_config), pretrained=None, classes=classes, repository=root / "repo",
                  allow_random_weights=True, probes=2)
    paper = factories.write_paper_checkpoint(root / "lora.pt", encoder="both", position="all", params=("q", "v"))
    options = {
        "base": ExportOptions(name="base", lora="none", templates=("a photo of a {}.",), **common),
        "clip-lora-gpu": ExportOptions(name="clip-lora-gpu", lora=str(paper), target="gpu",
                                       templates=("a photo of a {}.", "a {} in the wild."), **common),
        "peft-fp16": ExportOptions(name="peft-fp16", lora=str(factories.write_peft_adapter(root / "peft")),
                                   precision="fp16", templates=("a photo of a {}.",), **common),
    }
    return {name: json.loads((run_export(o).path / "manifest.json").read_text()) for name, o in options.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["base", "clip-lora-gpu", "peft-fp16"])
def test_the_manifest_is_written_as_before(exported, name: str) -> None:
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    now = dict(exported[name])
    assert now.pop("schema_version") == 1  # the one field added since, on purpose
    assert _shape(now) == _shape(golden)  # no section added, lost, or written as null
    assert {k: now[k] for k in STABLE if k in golden} == {k: golden[k] for k in STABLE if k in golden}
    assert {k: now["lora"].get(k) for k in STABLE_LORA} == {k: golden["lora"].get(k) for k in STABLE_LORA}
    assert now["merge"]["mode"] == golden["merge"]["mode"] and now["verification"]["passed"]


@pytest.mark.slow
def test_the_comparison_tells_the_manifests_apart(exported) -> None:
    """Each golden differs from the others in shape, so an equality above is not vacuous."""
    shapes = {name: _shape(json.loads((GOLDEN / f"{name}.json").read_text())) for name in exported}
    assert shapes["base"] != shapes["clip-lora-gpu"] != shapes["peft-fp16"] != shapes["base"]
