"""The INT8 gate asks for real images: ``--target cpu-int8`` takes ``--calibration DIR`` or an
explicit ``--uncalibrated`` (export/quantize.py says why: on generated probes near-ties flip,
so the agreement rule would refuse sound quantizations, while the 8 probes alone let a
quarter of flipped answers through unseen)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cliplora.cli import main
from cliplora.core.errors import FailedPrecondition, InvalidArgument
from cliplora.export import quantize
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.export.verify import Comparison
from tests import factories
from tests.factories import tree_snapshot


def _options(tmp_path: Path, tiny_config: Path, **overrides) -> ExportOptions:
    settings = dict(model=str(tiny_config), pretrained=None, lora="none",
                    classes=factories.write_classes(tmp_path / "classes.txt"), templates=(), name="int8",
                    repository=tmp_path / "repo", allow_random_weights=True, probes=2, target="cpu-int8")
    settings.update(overrides)
    return ExportOptions(**settings)


def test_cpu_int8_without_real_images_is_refused_unless_asked(tmp_path, tiny_config, capsys) -> None:
    with pytest.raises(InvalidArgument, match=r"--target cpu-int8 gates the INT8 graph .* give --calibration DIR "
                                              r"\(with 100 or more, at least 99% .*or --uncalibrated"):
        _options(tmp_path, tiny_config)
    with pytest.raises(InvalidArgument, match="--uncalibrated means no --calibration images"):
        _options(tmp_path, tiny_config, uncalibrated=True, calibration=tmp_path)
    with pytest.raises(InvalidArgument, match="--uncalibrated .* goes with --target cpu-int8"):
        _options(tmp_path, tiny_config, uncalibrated=True, target="portable")
    assert _options(tmp_path, tiny_config, uncalibrated=True).uncalibrated  # asked for: accepted
    assert main(["export", "--model", str(tiny_config), "--lora", "none", "--classes", str(tmp_path / "classes.txt"),
                 "--name", "int8", "--repository", str(tmp_path / "repo"), "--target", "cpu-int8"]) == 1
    assert "INVALID_ARGUMENT: --target cpu-int8 gates the INT8 graph" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()  # refused before anything was made


@pytest.mark.slow
def test_uncalibrated_publishes_on_the_bound_and_says_so(tmp_path, tiny_config) -> None:
    gate = run_export(_options(tmp_path, tiny_config, uncalibrated=True)).manifest.quantization.gate
    assert gate.passed and gate.images == 2 and gate.calibration_images == 0
    assert gate.min_top1_agreement is None  # the agreement rule did not apply: the manifest shows it
    assert 0 < gate.max_abs_logit <= gate.tolerance_abs_logit  # INT8 against fp32: measured


@pytest.mark.slow
def test_a_quarter_of_flipped_answers_is_refused_with_real_images(tmp_path, tiny_config, monkeypatch) -> None:
    """100 calibration images and an INT8 graph within the logit bound whose top-1 answer
    differs on a quarter of them: refused, nothing published."""
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i in range(quantize.MIN_IMAGES_FOR_RATE):
        factories.make_image(24 + i % 17, 20 + i % 13, seed=i).save(calibration / f"{i}.png")
    real = quantize.compare

    def flipping(actual: np.ndarray, expected: np.ndarray) -> Comparison:
        return Comparison(max_abs_logit=real(actual, expected).max_abs_logit, top1_agreement=0.75)

    repository = tmp_path / "repo"
    run_export(_options(tmp_path, tiny_config, name="kept", target="portable"))
    before = tree_snapshot(repository)
    monkeypatch.setattr(quantize, "compare", flipping)
    with pytest.raises(FailedPrecondition, match=r"INT8 accuracy gate failed, nothing published: INT8 agrees with "
                                                 r"fp32 on the top-1 class of 75\.0% of 102 images"):
        run_export(_options(tmp_path, tiny_config, calibration=calibration))
    after = tree_snapshot(repository)
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")}
