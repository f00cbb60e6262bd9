"""`cliplora bank promote` / `demote` in this process: a bank's adapter exported as the
merged classifier NAME--ID answers as the bank does for it (ONNX Runtime, within the
export's tolerance), its config names the promotion, `bank list` shows it, every refusal
publishes nothing, a promoted adapter is neither removed nor replaced until demoted, and
demote takes the classifier out. `bank top`: tests/test_bank_top.py."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cliplora.cli import main
from cliplora.core import contract
from cliplora.core.bank_runtime import open_bank
from cliplora.core.errors import CliploraError, FailedPrecondition, InvalidArgument, NotFound
from cliplora.core.hashing import sha256_file
from cliplora.core.manifest import Manifest
from cliplora.core.runtime import open_published, run_logits
from cliplora.export import bank_promotions, bank_version
from cliplora.export.bank_create import create_bank
from cliplora.export.bank_options import AdapterSpec, BankOptions
from cliplora.export.bank_promote import promote_adapter
from cliplora.export.bank_update import add_adapters, list_adapters, remove_adapter
from cliplora.export.model_config import parse_config, promotion_of, to_text
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.export.verify import FP32_TOLERANCE
from tests import banks, factories

pytestmark = pytest.mark.slow  # a bank, three adapters and several exports
BANK = "pb"
LONG_ID = "L" * 61  # pb--LLL...: 65 characters


@dataclass(frozen=True)
class Promoted:
    root: Path
    repo: Path
    config: Path
    weights: Path
    classes: Path
    loras: dict[str, Path]
    summary: dict[str, Any]  # what `cliplora bank promote` printed

    def snapshot(self) -> dict[str, bytes | None]:
        return banks.published_snapshot(self.repo)

    def config_text(self, model: str) -> str:
        return (self.repo / model / contract.CONFIG_FILENAME).read_text()


@pytest.fixture(scope="module")
def promoted(tmp_path_factory: pytest.TempPathFactory, tiny_base) -> Promoted:
    """Bank `pb` (a weights file, base classes) holding a1 (both towers), a2 (vision) and a
    61-character id; a1 promoted."""
    root = tmp_path_factory.mktemp("promote")
    config = factories.write_config(root)
    weights = root / "weights.pt"
    torch.save(tiny_base.model.state_dict(), weights)
    classes = factories.write_classes(root / "classes.txt", banks.CLASSES)
    create_bank(BankOptions(name=BANK, model=str(config), pretrained=str(weights), classes=classes,
                            repository=root / "repo"))
    loras = {"a1": factories.write_paper_checkpoint(root / "a1.pt", encoder="both", position="all",
                                                    params=("q", "v")),
             "a2": factories.write_paper_checkpoint(root / "a2.pt", encoder="vision", position="half-up", seed=4),
             LONG_ID: factories.write_paper_checkpoint(root / "long.pt", encoder="vision", position="top", seed=5)}
    here = Path.cwd()
    os.chdir(root)  # `bank add` given relative paths records them absolute: promote runs from anywhere
    try:
        add_adapters(root / "repo", BANK, [AdapterSpec(a, p.name, classes, ("a photo of a {}.", "a {} in the wild."))
                                           for a, p in loras.items()])
    finally:
        os.chdir(here)
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(["bank", "promote", BANK, "--adapter", "a1", "--repository", str(root / "repo"), "--quiet"]) == 0
    return Promoted(root, root / "repo", config, weights, classes, loras, json.loads(printed.getvalue()))


def test_the_promoted_adapter_answers_as_the_bank_within_the_export_tolerance(promoted: Promoted) -> None:
    bank = open_bank(promoted.repo, BANK)
    merged = open_published(promoted.repo, "pb--a1")
    crops = banks.images(6)
    record = bank.adapter("a1")
    embeds, names = bank.classes(record)
    expected = bank.logits(bank.image_embeddings(crops, record), embeds)
    got = run_logits(merged.session, crops)
    assert merged.labels() == names == banks.CLASSES
    assert np.abs(got - expected).max() < FP32_TOLERANCE
    base = bank.adapter(contract.BASE_ADAPTER)  # same class names: the base's answer is what a1 changes
    base_logits = bank.logits(bank.image_embeddings(crops, base), bank.classes(base)[0])
    assert np.abs(got - base_logits).max() > 20 * FP32_TOLERANCE  # not trivially equal


def test_promote_prints_what_it_published(promoted: Promoted) -> None:
    record = bank_version.latest(promoted.repo, BANK)[1].adapter("a1")
    assert record is not None
    summary = promoted.summary
    assert {k: summary[k] for k in ("name", "adapter", "promoted_to", "lora_sha256", "change", "version", "path")} \
        == {"name": BANK, "adapter": "a1", "promoted_to": "pb--a1", "lora_sha256": record.lora_sha256,
            "change": "promoted", "version": 1, "path": str(promoted.repo / "pb--a1" / "1")}
    assert summary["verification"]["passed"] is True


def test_the_promoted_config_names_the_bank_adapter_and_its_content(promoted: Promoted) -> None:
    bank_manifest = bank_version.latest(promoted.repo, BANK)[1]
    record = bank_manifest.adapter("a1")
    assert record is not None
    config = parse_config(promoted.config_text("pb--a1"))
    assert promotion_of(config) == contract.Promotion(BANK, "a1", record.lora_sha256)
    assert {k: config.parameters[k].string_value for k in (contract.PARAM_PROMOTED_FROM,
            contract.PARAM_PROMOTED_ADAPTER, contract.PARAM_PROMOTED_LORA_SHA256)} == \
        {"promoted_from": BANK, "promoted_adapter": "a1", "promoted_lora_sha256": record.lora_sha256}
    assert config.max_batch_size == bank_manifest.settings.max_batch_size
    manifest = Manifest.read(promoted.repo / "pb--a1" / "1" / contract.MANIFEST_FILENAME)
    assert manifest.lora.sha256 == record.lora_sha256 == sha256_file(promoted.loras["a1"])
    assert manifest.base == bank_manifest.source.base  # the bank's weights, not another base
    assert manifest.templates == record.templates == ["a photo of a {}.", "a {} in the wild."]
    assert manifest.classes == record.classes


def test_the_bank_records_the_lora_files_it_was_given_relative_as_absolute(promoted: Promoted) -> None:
    manifest = bank_version.latest(promoted.repo, BANK)[1]
    assert {a: manifest.adapter(a).lora.source for a in promoted.loras} == {  # type: ignore[union-attr]
        a: str(p) for a, p in promoted.loras.items()}


def test_bank_list_shows_promoted_to(promoted: Promoted, capsys: pytest.CaptureFixture[str]) -> None:
    listing = {a["adapter"]: a["promoted_to"] for a in list_adapters(promoted.repo, BANK)}
    assert listing == {"base": "", "a1": "pb--a1", "a2": "", LONG_ID: ""}
    assert main(["bank", "list", BANK, "--repository", str(promoted.repo)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [a["promoted_to"] for a in printed] == ["", "pb--a1", "", ""]


def test_promoting_again_changes_nothing(promoted: Promoted, capsys: pytest.CaptureFixture[str]) -> None:
    before = promoted.snapshot()
    assert main(["bank", "promote", BANK, "--adapter", "a1", "--repository", str(promoted.repo), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["change"] == "already promoted"
    assert promoted.snapshot() == before


# Each refusal: what to plant (a context manager), the call, the error and a part of its message.
@contextmanager
def _moved(path: Path) -> Iterator[None]:
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    try:
        yield
    finally:
        aside.rename(path)


@contextmanager
def _rewritten(path: Path, content: bytes) -> Iterator[None]:
    original = path.read_bytes()
    path.write_bytes(content)
    try:
        yield
    finally:
        path.write_bytes(original)


@contextmanager
def _model_copy(promoted: Promoted, source: str, target: str, edit: Callable[[str], str]) -> Iterator[None]:
    shutil.copytree(promoted.repo / source, promoted.repo / target)
    config = promoted.repo / target / contract.CONFIG_FILENAME
    config.write_text(edit(config.read_text()))
    try:
        yield
    finally:
        shutil.rmtree(promoted.repo / target)


def _unpromoted(text: str) -> str:
    config = parse_config(text)
    for key in (contract.PARAM_PROMOTED_FROM, contract.PARAM_PROMOTED_ADAPTER, contract.PARAM_PROMOTED_LORA_SHA256):
        del config.parameters[key]
    return to_text(config)


def _perturbed_weights(promoted: Promoted) -> AbstractContextManager[None]:
    state = torch.load(promoted.weights, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 0.5
    path = promoted.root / "perturbed.pt"
    torch.save(state, path)
    return _rewritten(promoted.weights, path.read_bytes())


REFUSALS: dict[str, tuple[Callable[[Promoted], AbstractContextManager[None]], str, dict[str, object],
                          type[CliploraError], str]] = {
    "unknown adapter": (lambda p: nullcontext(), BANK, {"adapter_id": "zz"}, NotFound, "has no adapter 'zz'"),
    "the base": (lambda p: nullcontext(), BANK, {"adapter_id": "base"}, InvalidArgument, "base model, not an adapter"),
    "an invalid id": (lambda p: nullcontext(), BANK, {"adapter_id": "a/b"}, InvalidArgument, "invalid adapter id"),
    "a name past 64 characters": (lambda p: nullcontext(), BANK, {"adapter_id": LONG_ID}, InvalidArgument,
                                  "65 characters: a model name has at most 64"),
    "not a bank": (lambda p: nullcontext(), "pb--a1", {"adapter_id": "a1"}, FailedPrecondition,
                   "is not an adapter bank"),
    "no such bank": (lambda p: nullcontext(), "nope", {"adapter_id": "a1"}, NotFound, "no bank 'nope'"),
    "a missing LoRA file": (lambda p: _moved(p.loras["a2"]), BANK, {"adapter_id": "a2"}, NotFound, "a2.pt of adapter "
                            "'a2' of bank 'pb' is missing"),
    "a changed LoRA file": (lambda p: _rewritten(p.loras["a2"], p.loras["a1"].read_bytes()), BANK,
                            {"adapter_id": "a2"}, FailedPrecondition, "a2.pt of adapter 'a2' of bank 'pb' changed"),
    "changed base weights": (_perturbed_weights, BANK, {"adapter_id": "a2"}, FailedPrecondition,
                             "are not the ones `bank create` loaded"),
    "--calibration on a portable bank": (lambda p: nullcontext(), BANK,
                                         {"adapter_id": "a2", "calibration": Path("images")}, InvalidArgument,
                                         "--calibration feeds the INT8 gate"),
    "a classifier under the name": (lambda p: _model_copy(p, "pb--a1", "pb--a2", _unpromoted), BANK,
                                    {"adapter_id": "a2"}, FailedPrecondition, "is not a promoted adapter"),
    "another promotion under the name": (lambda p: _model_copy(p, "pb--a1", "pb--a2", lambda t: t), BANK,
                                         {"adapter_id": "a2"}, FailedPrecondition,
                                         "'pb--a2' is adapter 'a1' of bank 'pb' promoted"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_publish_nothing(promoted: Promoted, case: str) -> None:
    plant, bank, kwargs, error, message = REFUSALS[case]
    with plant(promoted):
        before = promoted.snapshot()
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
            promote_adapter(promoted.repo, bank, **kwargs)  # type: ignore[arg-type]
        assert promoted.snapshot() == before


def test_a_promotion_of_an_earlier_content_is_not_shown_and_asks_for_demote(promoted: Promoted) -> None:
    """A NAME--ID whose recorded hash is not the bank's (the gateway would not route there)."""
    path = promoted.repo / "pb--a1" / contract.CONFIG_FILENAME
    stale = promoted.config_text("pb--a1").replace(bank_version.latest(promoted.repo, BANK)[1].adapter("a1").lora_sha256,
                                              "0" * 64)
    with _rewritten(path, stale.encode()):
        assert {a["adapter"]: a["promoted_to"] for a in list_adapters(promoted.repo, BANK)}["a1"] == ""
        before = promoted.snapshot()
        with pytest.raises(FailedPrecondition, match="earlier content of adapter 'a1'.*cliplora bank demote pb"):
            promote_adapter(promoted.repo, BANK, "a1")
        assert promoted.snapshot() == before


def test_the_export_refuses_an_adapter_that_is_not_the_promoted_content(promoted: Promoted) -> None:
    """The export's own check, after it reads the adapter: a file that changed after the
    promote command checked it is not published under the promotion's hash."""
    record = bank_version.latest(promoted.repo, BANK)[1].adapter("a2")
    assert record is not None
    options = ExportOptions(model=str(promoted.config), pretrained=str(promoted.weights),
                            lora=str(promoted.loras["a1"]), classes=promoted.classes, templates=(), name="pb--a2",
                            repository=promoted.repo, promotion=contract.Promotion(BANK, "a2", record.lora_sha256))
    before = promoted.snapshot()
    with pytest.raises(FailedPrecondition, match="is not the content adapter 'a2' of bank 'pb' holds"):
        run_export(options)
    assert promoted.snapshot() == before


def test_a_bank_reserves_its_promoted_names(promoted: Promoted, tiny_config: Path) -> None:
    before = promoted.snapshot()
    plain = dict(model=str(tiny_config), pretrained=None, allow_random_weights=True, lora="none",
                 classes=promoted.classes, templates=(), repository=promoted.repo)
    with pytest.raises(FailedPrecondition, match="'pb--zz' is reserved by the adapter bank 'pb'"):
        run_export(ExportOptions(name="pb--zz", **plain))  # type: ignore[arg-type]
    with pytest.raises(FailedPrecondition, match="'pb--x--y' is reserved by the adapter bank 'pb'"):
        create_bank(BankOptions(name="pb--x--y", model=str(tiny_config), pretrained=None, allow_random_weights=True,
                                repository=promoted.repo))
    with pytest.raises(InvalidArgument, match="is promoted as 'pb--a2', not 'other'"):
        ExportOptions(name="other", promotion=contract.Promotion(BANK, "a2", "ab" * 32), **plain)  # type: ignore[arg-type]
    assert promoted.snapshot() == before


def test_a_promoted_adapter_is_neither_removed_nor_replaced(promoted: Promoted) -> None:
    before = promoted.snapshot()
    with pytest.raises(FailedPrecondition, match="cannot remove adapter 'a1'.*promoted to 'pb--a1'.*"
                                                 "cliplora bank demote pb --adapter a1"):
        remove_adapter(promoted.repo, BANK, "a1")
    spec = AdapterSpec("a1", str(promoted.loras["a2"]), promoted.classes)
    with pytest.raises(FailedPrecondition, match="cannot replace adapter 'a1'.*cliplora bank demote pb --adapter a1"):
        add_adapters(promoted.repo, BANK, [AdapterSpec("a9", str(promoted.loras["a2"]), promoted.classes), spec])
    assert promoted.snapshot() == before


def test_a_bank_with_open_vocabulary_promotes_its_text_encoder_too(promoted: Promoted,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Banks cannot have open vocabulary yet: the path is ready for when they do (the bank's
    manifest says so, the promotion exports NAME--ID_text too, demote removes both)."""
    latest = bank_version.latest

    def with_open_vocabulary(root: Path, name: str):
        folder, manifest = latest(root, name)
        settings = manifest.settings.model_copy(update={"open_vocabulary": True})
        return folder, manifest.model_copy(update={"settings": settings})

    monkeypatch.setattr(bank_version, "latest", with_open_vocabulary)
    result = promote_adapter(promoted.repo, BANK, "a2")
    assert result.export is not None and result.export.text_path == promoted.repo / "pb--a2_text" / "1"
    assert parse_config(promoted.config_text("pb--a2")).parameters[contract.PARAM_TEXT_MODEL].string_value == "pb--a2_text"
    demoted = bank_promotions.demote_adapter(promoted.repo, BANK, "a2")
    assert (demoted.model, demoted.versions, demoted.text_model) == ("pb--a2", (1,), "pb--a2_text")
    assert not (promoted.repo / "pb--a2").exists() and not (promoted.repo / "pb--a2_text").exists()


def test_demote_takes_the_promotion_out(promoted: Promoted, capsys: pytest.CaptureFixture[str]) -> None:
    """Last in this module: it demotes a1, and the bank may then remove it."""
    before = promoted.snapshot()
    with pytest.raises(NotFound, match="adapter 'a2' of bank 'pb' is not promoted"):
        bank_promotions.demote_adapter(promoted.repo, BANK, "a2")
    with pytest.raises(NotFound, match="no bank 'nope'"):
        bank_promotions.demote_adapter(promoted.repo, "nope", "a1")
    assert promoted.snapshot() == before
    assert main(["bank", "demote", BANK, "--adapter", "a1", "--repository", str(promoted.repo)]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": BANK, "adapter": "a1", "demoted": "pb--a1",
                                                   "removed_versions": [1], "text_model": None}
    assert not (promoted.repo / "pb--a1").exists()
    assert {a["adapter"]: a["promoted_to"] for a in list_adapters(promoted.repo, BANK)}["a1"] == ""
    assert {k: v for k, v in promoted.snapshot().items() if not k.startswith("pb--a1")} == \
        {k: v for k, v in before.items() if not k.startswith("pb--a1")}  # the bank untouched
    assert remove_adapter(promoted.repo, BANK, "a1").manifest.adapter("a1") is None


def test_remove_model_takes_every_version_and_the_config_last(tmp_path: Path) -> None:
    """Versions first, oldest first, each renamed away in one step (Triton never sees half a
    version, nor an older version left to load instead); then the files, config.pbtxt last."""
    folder = tmp_path / "m"
    for version in (1, 2, 10):
        (folder / str(version)).mkdir(parents=True)
        (folder / str(version) / contract.MODEL_FILENAME).write_bytes(b"x")
    (folder / contract.LABELS_FILENAME).write_text("a\n")
    (folder / contract.CONFIG_FILENAME).write_text('name: "m"\n')
    events: list[str] = []
    rename, rmtree, unlink = os.rename, shutil.rmtree, Path.unlink

    def renamed(source: Path, target: Path) -> None:
        events.append(f"rename {Path(source).name}")
        rename(source, target)

    def removed_tree(path: Path) -> None:
        events.append(f"rmtree {Path(path).name.split('-')[0]}")
        rmtree(path)

    def removed(path: Path, missing_ok: bool = False) -> None:
        events.append(f"unlink {path.name}")
        unlink(path, missing_ok=missing_ok)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bank_promotions.os, "rename", renamed)
        patch.setattr(bank_promotions.shutil, "rmtree", removed_tree)
        patch.setattr(Path, "unlink", removed)
        assert bank_promotions.remove_model(tmp_path, "m") == [1, 2, 10]
    assert not folder.exists()
    assert events == ["rename 1", "rename 2", "rename 10", "rmtree .removing", "rmtree .removing", "rmtree .removing",
                      "unlink labels.txt", "unlink config.pbtxt"]


@pytest.fixture(scope="module")
def int8_bank(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Path:
    root = tmp_path_factory.mktemp("promote-int8")
    classes = factories.write_classes(root / "classes.txt", banks.CLASSES)
    create_bank(BankOptions(name="qb", model=str(tiny_config), pretrained=None, allow_random_weights=True,
                            classes=classes, target="cpu-int8", repository=root / "repo"))
    lora = factories.write_paper_checkpoint(root / "v.pt", encoder="vision", position="all", params=("q", "k", "v"))
    add_adapters(root / "repo", "qb", [AdapterSpec("v", str(lora), classes)])
    return root / "repo"


def test_a_cpu_int8_bank_promotes_at_cpu_int8_gated_as_the_bank(int8_bank: Path) -> None:
    """The bank gates each adapter's INT8 answers on the probe images alone; so does its promotion."""
    result = promote_adapter(int8_bank, "qb", "v")
    assert result.export is not None
    manifest = result.export.manifest
    assert manifest.quantization is not None and manifest.quantization.gate is not None
    assert manifest.quantization.gate.calibration_images == 0 and manifest.quantization.gate.passed
    config = parse_config((int8_bank / "qb--v" / contract.CONFIG_FILENAME).read_text())
    assert config.parameters[contract.PARAM_PRECISION].string_value == "int8"
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    bank = open_bank(int8_bank, "qb")
    record = bank.adapter("v")
    crops = banks.images(6)
    expected = bank.logits(bank.image_embeddings(crops, record), bank.classes(record)[0])
    got = run_logits(open_published(int8_bank, "qb--v").session, crops)
    assert record.verification is not None and record.verification.int8_gate is not None
    bound = record.verification.int8_gate.tolerance_abs_logit + manifest.quantization.gate.tolerance_abs_logit
    assert np.abs(got - expected).max() < bound + FP32_TOLERANCE  # each INT8 graph within its gate of the fp32 one
    base = bank.adapter(contract.BASE_ADAPTER)
    assert np.abs(got - bank.logits(bank.image_embeddings(crops, base), bank.classes(base)[0])).max() > bound
