"""``config.pbtxt`` is printed from tritonclient's `ModelConfig` protobuf, and means what
the string-built configs of commit 9752bcb meant (tests/data/configs holds them), which
is compared by parsing, never by substring."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from cliplora.core import contract
from cliplora.core.errors import FailedPrecondition
from cliplora.core.repository import render_labels
from cliplora.export import model_config, publish

CONFIGS = Path(__file__).parent / "data" / "configs"
SPEC = contract.TensorSpec(image_size=224, num_classes=10)
CASES = {  # golden file -> (precision, max_batch_size, target)
    "portable-fp32": ("fp32", 32, "portable"),
    "portable-fp16": ("fp16", 32, "portable"),
    "gpu-fp32": ("fp32", 32, "gpu"),
    "gpu-fp16-batch1": ("fp16", 1, "gpu"),
}


@pytest.mark.parametrize("golden", sorted(CASES))
def test_configs_mean_what_they_meant(golden: str) -> None:
    precision, batch, target = CASES[golden]
    before = model_config.parse_config((CONFIGS / f"{golden}.pbtxt").read_text())
    now = model_config.model_config("pets", SPEC, precision, batch, target)
    assert now == before
    assert model_config.parse_config(model_config.render_config("pets", SPEC, precision, batch, target)) == before


def test_the_comparison_can_fail() -> None:
    """Each golden file differs from the others, so an equality above is not vacuous."""
    parsed = {name: model_config.parse_config((CONFIGS / f"{name}.pbtxt").read_text()) for name in CASES}
    assert len({text_format.MessageToString(c) for c in parsed.values()}) == len(CASES)
    assert model_config.model_config("pets", SPEC, "fp32", 16, "gpu") != parsed["gpu-fp32"]  # profile, warm-up


def test_a_model_exported_by_the_old_writer_takes_new_versions(tmp_path: Path) -> None:
    """`check_compatible` compares meanings: the old text, formatted differently, still matches."""
    folder = tmp_path / "pets"
    folder.mkdir()
    (folder / "labels.txt").write_text(render_labels([f"c{i}" for i in range(10)]))
    (folder / "config.pbtxt").write_text((CONFIGS / "gpu-fp32.pbtxt").read_text())
    labels = (folder / "labels.txt").read_text()
    publish.check_compatible(tmp_path, "pets", model_config.model_config("pets", SPEC, "fp32", 32, "gpu"), labels)
    with pytest.raises(FailedPrecondition, match="different configuration"):
        publish.check_compatible(tmp_path, "pets", model_config.model_config("pets", SPEC, "fp32", 32), labels)
    (folder / "config.pbtxt").write_text("name: ")
    with pytest.raises(FailedPrecondition, match="is not a valid Triton model config"):
        publish.check_compatible(tmp_path, "pets", model_config.model_config("pets", SPEC, "fp32", 32), labels)
