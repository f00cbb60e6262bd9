"""The typed records that cross stage boundaries: manifest.json and run.json.

Files written before the records were typed (tests/data/manifests, tests/data/runs,
each produced by the export and finetune code of commit 9752bcb) still load and come
back out unchanged; malformed files and unknown schema versions are refused with a
message that names the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from cliplora.core.errors import FailedPrecondition, NotFound
from cliplora.core.manifest import Manifest, PaperLoraRecord, PeftLoraRecord
from cliplora.core.run_record import RunRecord

DATA = Path(__file__).parent / "data"
OLD_MANIFESTS = sorted((DATA / "manifests").glob("*.json"))
OLD_RUNS = sorted((DATA / "runs").glob("*.json"))


@pytest.mark.parametrize("path", OLD_MANIFESTS, ids=lambda p: p.stem)
def test_manifests_written_before_still_load(path: Path) -> None:
    manifest = Manifest.read(path)
    written = json.loads(path.read_text())
    assert "schema_version" not in written  # these predate the field: version 1
    assert manifest.schema_version == 1
    again = manifest.to_dict()
    assert again.pop("schema_version") == 1
    assert again == written  # every field, with its name and value


def test_old_manifests_read_as_typed_records() -> None:
    by_name = {p.stem: Manifest.read(p) for p in OLD_MANIFESTS}
    assert set(by_name) == {"base", "clip-lora-gpu", "peft-fp16"}
    paper, peft, base = by_name["clip-lora-gpu"], by_name["peft-fp16"], by_name["base"]
    assert isinstance(paper.lora, PaperLoraRecord) and paper.lora.scaling == "alpha/sqrt(r)"
    assert paper.lora.targets["vision"]["q"] == list(range(12)) and paper.gpu_serving is not None
    assert paper.onnx.tensorrt_engine_key and paper.onnx.tensorrt_engine_key.startswith("head_")
    assert isinstance(peft.lora, PeftLoraRecord) and peft.precision == "fp16" and peft.gpu_serving is None
    assert base.lora.format == "none" and base.merge.mode == "base" and base.verification.onnx_vs_base is None
    assert base.base.weights.kind == "random" and base.base_weights_id == "random"


@pytest.mark.parametrize("path", OLD_RUNS, ids=lambda p: p.stem)
def test_run_records_written_before_still_load(path: Path) -> None:
    record = RunRecord.read(path)
    written = json.loads(path.read_text())
    again = record.to_dict()
    assert again.pop("schema_version") == 1 and again == written
    assert record.status == path.stem
    assert (record.accuracy is not None) == (record.status == "done")


def _manifest_data() -> dict:
    return json.loads((DATA / "manifests" / "clip-lora-gpu.json").read_text())


def test_unknown_schema_version_is_refused() -> None:
    data = _manifest_data() | {"schema_version": 2, "a_field_from_the_future": 1}
    with pytest.raises(FailedPrecondition, match=r"m\.json: manifest schema_version 2 is not one this cliplora reads \(1\)"):
        Manifest.from_dict(data, "m.json")


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["base"]["weights"].pop("kind"), r"base\.weights\.kind: Field required"),
    (lambda d: d.update(precision=16), r"precision: Input should be a valid string"),
    (lambda d: d["lora"].update(format="lokr"), r"lora: Input tag 'lokr' found using 'format' does not match"),
    (lambda d: d["lora"].update(encoder="both", use_rslora=True), r"lora\.clip-lora\.use_rslora: Extra inputs"),
    (lambda d: d.pop("verification"), r"verification: Field required"),
])
def test_malformed_manifest_names_the_field(change, message) -> None:
    data = _manifest_data()
    change(data)
    with pytest.raises(FailedPrecondition, match=rf"m\.json is not a valid manifest: .*{message}"):
        Manifest.from_dict(data, "m.json")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="missing"):
        Manifest.read(tmp_path / "manifest.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FailedPrecondition, match="bad.json is not valid JSON"):
        Manifest.read(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(FailedPrecondition, match="list.json is not a valid finetune run record: expected a JSON object"):
        RunRecord.read(tmp_path / "list.json")


def test_records_are_frozen() -> None:
    manifest = Manifest.read(OLD_MANIFESTS[0])
    with pytest.raises(ValidationError, match="frozen"):
        manifest.precision = "fp16"  # type: ignore[misc]
    stamped = manifest.model_copy(update={"version": 7})
    assert stamped.version == 7 and stamped.to_dict()["version"] == 7 and manifest.version == 1
