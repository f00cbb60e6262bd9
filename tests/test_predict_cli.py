"""`cliplora predict` and the command line: real image files in, the contract's JSON out."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from cliplora.cli import main
from cliplora.core.predictions import rank
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.model.adapters import load_adapter
from cliplora.model.reference import build_reference
from cliplora.predict import predict_files
from tests import factories

CLASSES = ["cat", "dog", "red_panda", "golden_retriever"]


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("published")
    lora = factories.write_paper_checkpoint(root / "lora.pt", encoder="both", position="half-up", r=4, alpha=2.0)
    classes = factories.write_classes(root / "classes.txt", CLASSES)
    common = dict(model=str(tiny_config), pretrained=None, classes=classes, templates=("a photo of a {}.",),
                  repository=root / "repo", allow_random_weights=True, probes=4)
    run_export(ExportOptions(lora=str(lora), name="adapted", **common))
    run_export(ExportOptions(lora="none", name="base", **common))
    images = []
    for i, (fmt, mode, size) in enumerate([("jpg", "RGB", (61, 45)), ("png", "RGBA", (32, 80)), ("png", "P", (200, 199)),
                                            ("bmp", "L", (33, 33)), ("webp", "RGB", (90, 60))]):
        path = root / f"image{i}.{fmt}"
        factories.make_image(*size, mode=mode, seed=i).save(path)
        images.append(path)
    return root, lora, images


def _pytorch_logits(tiny_base, lora: Path | None, images: list[Path]) -> np.ndarray:
    """The paper's way: PIL file -> open_clip transform -> (unmerged) CLIP -> logits."""
    from PIL import Image

    adapter = load_adapter(str(lora), 12, 12) if lora else None
    model = build_reference(tiny_base.model, adapter)
    transform = open_clip.image_transform(32, is_train=False, mean=tiny_base.mean, std=tiny_base.std)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tiny_base.tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])), dim=-1)
        batch = torch.stack([transform(Image.open(p)) for p in images])
        features = F.normalize(model.encode_image(batch), dim=-1)
    return (tiny_base.logit_scale * features @ text.t()).numpy()


@pytest.mark.slow
def test_predict_equals_pytorch_on_image_files(published, tiny_base) -> None:
    root, lora, images = published
    results = predict_files(root / "repo", "adapted", images, top_k=0)
    expected = _pytorch_logits(tiny_base, lora, images)
    for result, path, row in zip(results, images, expected, strict=True):
        assert result["image"] == str(path)
        by_index = {p["index"]: p for p in result["predictions"]}
        got = np.array([by_index[i]["logit"] for i in range(len(CLASSES))])
        np.testing.assert_allclose(got, row, atol=1e-4, rtol=0)
        assert [by_index[i]["label"] for i in range(len(CLASSES))] == CLASSES
    base = predict_files(root / "repo", "base", images, top_k=0)
    base_logits = np.array([[p["logit"] for p in sorted(r["predictions"], key=lambda p: p["index"])] for r in base])
    np.testing.assert_allclose(base_logits, _pytorch_logits(tiny_base, None, images), atol=1e-4, rtol=0)
    assert np.abs(base_logits - expected).max() > 1e-2  # the adapter matters


def test_predictions_are_sorted_with_softmax_scores() -> None:
    logits = np.array([1.0, 3.0, 2.0, 3.0], dtype=np.float32)
    ranked = rank(logits, ["a", "b", "c", "d"], 0)
    assert [p.label for p in ranked] == ["b", "d", "c", "a"]
    assert sum(p.score for p in ranked) == pytest.approx(1.0)
    expected = np.exp(logits - 3) / np.exp(logits - 3).sum()
    assert ranked[0].score == pytest.approx(expected[1])
    assert [p.label for p in rank(logits, ["a", "b", "c", "d"], 2)] == ["b", "d"]


@pytest.mark.slow
def test_cli_predict_json_and_errors(published, capsys) -> None:
    root, _, images = published
    assert main(["predict", "--repository", str(root / "repo"), "--name", "adapted", "--top-k", "2", *map(str, images[:2])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [len(r["predictions"]) for r in out] == [2, 2]
    assert set(out[0]["predictions"][0]) == {"label", "index", "score", "logit"}
    assert out[0]["predictions"][0]["logit"] >= out[0]["predictions"][1]["logit"]

    cases = [
        (["--name", "missing", str(images[0])], "NOT_FOUND: model 'missing' not found"),
        (["--name", "adapted", str(root / "nope.jpg")], "NOT_FOUND: image file not found"),
        (["--name", "adapted", str(root / "lora.pt")], "INVALID_ARGUMENT: .*lora.pt: not a decodable image"),
        (["--name", "adapted", "--top-k", "-1", str(images[0])], "INVALID_ARGUMENT: top_k must be"),
        (["--name", "adapted", "--version", "7", str(images[0])], "NOT_FOUND: model 'adapted' has no version 7"),
        (["--name", "../etc", str(images[0])], "INVALID_ARGUMENT: invalid model name"),
    ]
    for args, message in cases:
        assert main(["predict", "--repository", str(root / "repo"), *args]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert re.search(message, captured.err), captured.err


@pytest.mark.subprocess
def test_console_script_export_contract_flags(tmp_path, tiny_config) -> None:
    """The installed `cliplora` script with the contract's flags, in a fresh process."""
    classes = factories.write_classes(tmp_path / "classes.txt")
    lora = factories.write_paper_checkpoint(tmp_path / "lora.pt", encoder="text", position="top3")
    script = Path(sys.executable).with_name("cliplora")
    command = [str(script), "export", "--model", str(tiny_config), "--lora", str(lora), "--classes", str(classes),
               "--template", "a photo of a {}.", "--template", "a {} in the wild.", "--name", "cli",
               "--repository", str(tmp_path / "repo"), "--precision", "fp32", "--allow-random-weights"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["version"] == 1 and summary["verification"]["passed"]
    assert "verifying against the unmerged PyTorch reference" in done.stderr
    assert "RANDOM weights" in done.stderr

    refused = subprocess.run(command[:-1], capture_output=True, text=True, timeout=300)  # no --allow-random-weights
    assert refused.returncode == 1 and "INVALID_ARGUMENT: no weights" in refused.stderr
    assert sorted(p.name for p in (tmp_path / "repo" / "cli").iterdir()) == ["1", "config.pbtxt", "labels.txt"]
