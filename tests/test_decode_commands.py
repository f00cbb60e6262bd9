"""``--decode`` and ``--exif-orientation`` on the commands that read image files: predict
(the crops it classifies), evaluate (in process; refused with --target, where the gateway
decides) and finetune (the orientation; its options, batches and run record)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from cliplora.cli import main
from cliplora.core import preprocess
from cliplora.core.preprocess import Decoding
from cliplora.loadtest.photos import jpeg_bytes, photo_like


@pytest.fixture(scope="module")
def tiny_repository_files(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The tiny models (image size 32) and three files: a photo stored turned with orientation tag 6,
    the same pixels upright without a tag, and a JPEG large enough for the decoder to scale."""
    folder = tmp_path_factory.mktemp("decode-images")
    upright = photo_like(60, 40, seed=1)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone turned clockwise stores
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    files = {"tagged": folder / "tagged.png", "upright": folder / "upright.png", "stored": folder / "stored.png",
             "large": folder / "large.jpg"}
    stored.save(files["tagged"], exif=exif.tobytes())
    upright.save(files["upright"])
    stored.save(files["stored"])
    files["large"].write_bytes(jpeg_bytes(photo_like(256, 192, seed=2)))
    return tiny_repository, files


def predict_logits(capsys: pytest.CaptureFixture[str], repository: Path, *argv: str) -> list[list[float]]:
    assert main(["predict", "--repository", str(repository), "--name", "base", "--top-k", "0", *argv]) == 0
    results = json.loads(capsys.readouterr().out)
    return [[p["logit"] for p in sorted(r["predictions"], key=lambda p: p["index"])] for r in results]


def test_predict_turns_tagged_photos_upright_unless_told(tiny_repository_files, capsys) -> None:
    repository, files = tiny_repository_files
    tagged, upright, stored = (str(files[k]) for k in ("tagged", "upright", "stored"))
    applied = predict_logits(capsys, repository, tagged, upright)
    assert applied[0] == applied[1]  # the tagged photo classified as it is seen
    ignored = predict_logits(capsys, repository, "--exif-orientation", "ignore", tagged, stored)
    assert ignored[0] == ignored[1]  # open_clip's way: the stored pixels
    assert applied[0] != ignored[0]


def test_predict_decode_flag_chooses_the_crops(tiny_repository_files, capsys) -> None:
    repository, files = tiny_repository_files
    large = str(files["large"])
    fast, default, exact = (predict_logits(capsys, repository, *flag, large)
                            for flag in (["--decode", "fast"], [], ["--decode", "exact"]))
    assert fast == default  # fast is the default (the gate's choice, README "Phone photos")
    assert not np.allclose(fast, exact, rtol=0, atol=1e-6), "fast decoded the 256 x 192 JPEG in full"
    assert np.allclose(fast, exact, rtol=0, atol=0.5)


def test_evaluate_passes_decoding_in_process_and_refuses_it_with_a_target(tiny_repository_files, capsys,
                                                                          monkeypatch, tmp_path) -> None:
    repository, files = tiny_repository_files
    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        (tmp_path / "data" / label / "a.png").write_bytes(files["tagged"].read_bytes())
    seen: list[Decoding] = []
    real = preprocess.preprocess_file

    def spy(path, size, **kwargs):
        seen.append(kwargs["decoding"])
        return real(path, size, **kwargs)

    monkeypatch.setattr(preprocess, "preprocess_file", spy)
    base = ["evaluate", "--data", str(tmp_path / "data"), "--name", "base", "--repository", str(repository), "--quiet"]
    assert main([*base, "--decode", "exact", "--exif-orientation", "ignore"]) == 0, capsys.readouterr().err
    assert len(seen) == 2 and set(seen) == {Decoding("exact", "ignore")}
    assert json.loads(capsys.readouterr().out)["images"] == 2
    seen.clear()
    assert main(base) == 0
    assert len(seen) == 2 and set(seen) == {Decoding()}
    assert main([*base, "--target", "127.0.0.1:1", "--decode", "exact"]) == 1
    assert "--decode and --exif-orientation apply in process" in capsys.readouterr().err


def test_finetune_orientation_flag_reaches_options_batches_and_record(tiny_repository_files) -> None:
    import argparse

    from cliplora.core.run_record import FinetuneOptionsRecord
    from cliplora.finetune import cli as finetune_cli
    from cliplora.finetune.batches import _read_rgb

    _, files = tiny_repository_files
    parser = argparse.ArgumentParser()
    finetune_cli.add_arguments(parser)
    common = ["--model", "m", "--data", "d", "--shots", "1", "--output", "o"]
    assert finetune_cli.options(parser.parse_args(common)).exif_orientation == "apply"
    ignored = finetune_cli.options(parser.parse_args([*common, "--exif-orientation", "ignore"]))
    assert ignored.exif_orientation == "ignore" and ignored.fingerprint()["exif_orientation"] == "ignore"
    assert _read_rgb(files["tagged"], "apply").size == (60, 40)
    assert _read_rgb(files["tagged"], "ignore").size == (40, 60)
    record = {**FinetuneOptionsRecord.model_json_schema()["properties"]}
    assert record["exif_orientation"]["default"] == "apply"  # run.json files written before it still load


def test_loadtest_photo_tag_is_what_a_phone_writes() -> None:
    """The rotated photo of these tests, as the generator writes it, opens upright in Pillow too."""
    data = jpeg_bytes(photo_like(60, 40, seed=1).transpose(Image.Transpose.ROTATE_90), orientation=6)
    from PIL import ImageOps

    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (60, 40)
