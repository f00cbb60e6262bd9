"""A bank with open vocabulary, exported and published (no Triton): ``bank create
--open-vocabulary`` then ``bank add`` of adapters that touch the text tower and one that
does not. ``NAME_text`` is published with every version of the bank; each slot is its
adapter's own adapted text encoder (against the model library's merge and against that
adapter's own ``export --open-vocabulary``), mixed batches give each row its own slot,
the manifest records each slot's check, a text update the bank cannot hold is refused
with nothing published, and a bank manifest written before open vocabulary still serves.

Sessions are ONNX Runtime's on the published files (`cliplora.core.runtime`). The quick
parts: tests/test_bank_text_units.py; served by Triton: tests/test_bank_text_triton.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from cliplora.core import contract, open_vocab
from cliplora.core.bank_manifest import BankManifest, BankTextManifest
from cliplora.core.errors import FailedPrecondition, InvalidArgument
from cliplora.core.hashing import sha256_file
from cliplora.core.preprocess import preprocess_file
from cliplora.core.runtime import (
    create_session,
    open_published,
    open_text_encoder,
    run_image_embeddings,
)
from cliplora.core.tokenizer import get_tokenizer
from cliplora.export.bank_create import create_bank
from cliplora.export.bank_options import AdapterSpec, BankOptions
from cliplora.export.bank_update import add_adapters, list_adapters, remove_adapter
from cliplora.export.open_vocabulary import PROBE_STRINGS
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.model.adapters import load_adapter
from cliplora.model.merge import merge_adapter
from cliplora.predict import predict_files
from tests import banks, factories

pytestmark = pytest.mark.slow  # banks and exports (seconds each); the quick parts: test_bank_text_units.py
TEMPLATES = ("a photo of a {}.", "a {} in the wild.")
LABELS = ["wolf", "snow_leopard", "a very small teapot", "東京タワー", "Café"]  # none of the classes
STRINGS = [*open_vocab.prompts(LABELS, TEMPLATES), *PROBE_STRINGS]
FIDELITY = 1e-4  # issue 21: a slot's logits equal its adapter's own merged export within 1e-4
ADAPTERS = {  # id -> the checkpoint's layout: two with text updates, one without
    "text": dict(encoder="text", position="all", params=("q", "v"), seed=31),
    "both": dict(encoder="both", position="half-up", params=("q", "k", "v"), seed=32),
    "vision": dict(encoder="vision", position="all", params=("q", "k"), seed=33),
}


@pytest.fixture(scope="module")
def ov_bank(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> dict:
    """Bank `ov` (q,k,v, rank 2, open vocabulary, the base with classes): version 2 adds
    `text` and `both`, version 3 `vision`, version 4 replaces `text`, version 5 removes `both`."""
    root = tmp_path_factory.mktemp("bank-text")
    repo = root / "repo"
    classes = factories.write_classes(root / "classes.txt", banks.CLASSES)
    loras = {a: factories.write_paper_checkpoint(root / f"{a}.pt", **layout) for a, layout in ADAPTERS.items()}
    loras["text2"] = factories.write_paper_checkpoint(root / "text2.pt", **{**ADAPTERS["text"], "seed": 34})
    results = [create_bank(BankOptions(name="ov", model=str(tiny_config), pretrained=None, classes=classes,
                                       templates=TEMPLATES, open_vocabulary=True, allow_random_weights=True,
                                       repository=repo, probes=2))]
    spec = {a: AdapterSpec(a, str(loras[a]), classes, TEMPLATES) for a in ADAPTERS}
    results.append(add_adapters(repo, "ov", [spec["text"], spec["both"]], probes=2))
    results.append(add_adapters(repo, "ov", [spec["vision"]], probes=2))
    results.append(add_adapters(repo, "ov", [AdapterSpec("text", str(loras["text2"]), classes, TEMPLATES)], probes=2))
    results.append(remove_adapter(repo, "ov", "both"))
    return {"root": root, "repo": repo, "classes": classes, "loras": loras, "results": results}


def _text_session(repo: Path, version: int) -> ort.InferenceSession:
    return create_session(repo / "ov_text" / str(version) / contract.MODEL_FILENAME, providers=["CPUExecutionProvider"])


def _embed(session: ort.InferenceSession, strings: list[str], slots: list[int]) -> np.ndarray:
    tokens = get_tokenizer()(strings, contract.CONTEXT_LENGTH)
    return session.run([contract.TEXT_OUTPUT_NAME], {
        contract.TEXT_INPUT_NAME: tokens.astype(np.int32),
        contract.BANK_ADAPTER_NAME: np.asarray(slots, dtype=np.int32).reshape(-1, 1)})[0]


@torch.no_grad()
def _merged_text(tiny_base, lora: Path | None, strings: list[str]) -> np.ndarray:
    """Unit text embeddings of the adapter merged into the base (the model library's merge)."""
    model = tiny_base.model
    if lora is not None:
        adapter = load_adapter(str(lora), len(tiny_base.text_blocks), len(tiny_base.vision_blocks))
        model = merge_adapter(tiny_base.model, adapter)[0]
    return F.normalize(model.encode_text(tiny_base.tokenizer(strings)), dim=-1).numpy()


def test_the_text_encoder_is_published_with_every_version_of_the_bank(ov_bank) -> None:
    repo, results = ov_bank["repo"], ov_bank["results"]
    assert [r.version for r in results] == [1, 2, 3, 4, 5]
    for result in results:
        version, files = result.version, result.manifest.files
        folder = repo / "ov_text" / str(version)
        text = BankTextManifest.read(folder / contract.MANIFEST_FILENAME)
        assert (text.name, text.bank, text.version, text.slots) == ("ov_text", "ov", version, files.slots)
        assert files.text is not None and text.files == files.text
        assert sha256_file(folder / contract.BANK_FACTORS_FILENAME) == files.text.factors_sha256
        assert sha256_file(folder / contract.MODEL_FILENAME) == files.text.model_sha256
        assert _text_session(repo, version).get_inputs()[0].name == contract.TEXT_INPUT_NAME
    inodes = {os.stat(repo / "ov_text" / str(r.version) / contract.BANK_BASE_WEIGHTS_FILENAME).st_ino for r in results}
    assert len(inodes) == 1, "every version of the text encoder hard-links the first one's base weights"
    bank_config = (repo / "ov" / contract.CONFIG_FILENAME).read_text()
    assert f'key: "{contract.PARAM_TEXT_MODEL}"' in bank_config and '"ov_text"' in bank_config
    assert [r.manifest.files.slots for r in results] == [1, 3, 4, 5, 5]  # slots are never given out twice


def test_each_slot_is_its_adapters_own_text_encoder(ov_bank, tiny_base) -> None:
    repo, loras = ov_bank["repo"], ov_bank["loras"]
    manifest = ov_bank["results"][3].manifest  # text (replaced), both, vision
    session = _text_session(repo, 4)
    base = _embed(session, STRINGS, [0] * len(STRINGS))
    assert np.abs(base - _merged_text(tiny_base, None, STRINGS)).max() < 1e-5
    for adapter, lora in (("text", loras["text2"]), ("both", loras["both"]), ("vision", loras["vision"])):
        slot = manifest.adapter(adapter).slot
        got = _embed(session, STRINGS, [slot] * len(STRINGS))
        assert np.abs(got - _merged_text(tiny_base, lora, STRINGS)).max() < 1e-5, adapter
        moved = np.abs(got - base).max()
        assert moved > 1e-3 if adapter != "vision" else moved < 1e-6, (adapter, moved)
    # The replaced adapter's slot answers as the base from then on; version 3 still has it.
    old = ov_bank["results"][1].manifest.adapter("text").slot
    assert old != manifest.adapter("text").slot and np.abs(_embed(session, STRINGS, [old] * len(STRINGS)) - base).max() < 1e-6
    then = _embed(_text_session(repo, 3), STRINGS, [old] * len(STRINGS))
    assert np.abs(then - _merged_text(tiny_base, loras["text"], STRINGS)).max() < 1e-5
    # A removed adapter's slot, too (version 5).
    gone = manifest.adapter("both").slot
    assert np.abs(_embed(_text_session(repo, 5), STRINGS, [gone] * len(STRINGS)) - base).max() < 1e-6


def test_request_time_labels_on_a_slot_equal_its_adapters_own_open_vocabulary_export(ov_bank, tiny_config) -> None:
    """Logits for labels none of the classes name, as the gateway computes them for a bank
    adapter (the bank's image embeddings of the slot against its slot of ``NAME_text``),
    equal those of the adapter's own merged ``export --open-vocabulary``."""
    repo, result = ov_bank["repo"], ov_bank["results"][3]
    crops = banks.images(3, seed=21)
    bank, text = banks.session(result.path), _text_session(repo, 4)
    scale = result.manifest.settings.logit_scale
    prompts = open_vocab.prompts(LABELS, TEMPLATES)

    def bank_logits(slot: int) -> np.ndarray:
        heads = open_vocab.label_embeddings(_embed(text, prompts, [slot] * len(prompts)), len(LABELS))
        return open_vocab.open_vocabulary_logits(banks.bank_embeds(bank, crops, [slot] * len(crops)), heads, scale)

    base = bank_logits(0)
    for adapter in ("text", "both"):
        exported = run_export(ExportOptions(
            model=str(tiny_config), pretrained=None, lora=str(ov_bank["loras"]["text2" if adapter == "text" else adapter]),
            classes=ov_bank["classes"], templates=TEMPLATES, name=f"own-{adapter}", repository=ov_bank["root"] / "own",
            allow_random_weights=True, probes=1, open_vocabulary=True))
        model = open_published(exported.path.parent.parent, f"own-{adapter}")
        encoder = open_text_encoder(model)
        expected = encoder.logits(run_image_embeddings(model.session, crops), encoder.label_heads(LABELS))
        got = bank_logits(result.manifest.adapter(adapter).slot)
        assert np.abs(got - expected).max() < FIDELITY, adapter
        assert np.abs(got - base).max() > 100 * FIDELITY, f"{adapter} answers the labels as the base"
        # its own prompts too (the export's text encoder, the bank's slot): as strings, one by one
        own = encoder.embed(STRINGS)
        assert np.abs(_embed(text, STRINGS, [result.manifest.adapter(adapter).slot] * len(STRINGS)) - own).max() < 1e-5


def test_predict_ranks_request_time_labels_with_an_adapters_text_encoder(ov_bank, tmp_path) -> None:
    """`cliplora predict --adapter ID --labels ...` on the bank, in process: the slot's image
    embeddings against the labels through the slot's text encoder, with the adapter's templates."""
    repo, manifest = ov_bank["repo"], ov_bank["results"][-1].manifest
    paths = []
    for seed in range(2):
        factories.make_image(40, 30, seed=seed).save(path := tmp_path / f"{seed}.png")
        paths.append(path)
    crops = np.stack([preprocess_file(p, manifest.settings.image_size) for p in paths])
    bank, text = banks.session(repo / "ov" / "5"), _text_session(repo, 5)
    prompts = open_vocab.prompts(LABELS, TEMPLATES)
    answers = {}
    for adapter in ("text", "vision", ""):
        slot = manifest.adapter(adapter or "base").slot
        heads = open_vocab.label_embeddings(_embed(text, prompts, [slot] * len(prompts)), len(LABELS))
        expected = open_vocab.open_vocabulary_logits(banks.bank_embeds(bank, crops, [slot] * len(crops)), heads,
                                                     manifest.settings.logit_scale)
        printed = predict_files(repo, "ov", paths, labels=LABELS, adapter=adapter, top_k=0)
        got = np.array([[{p["label"]: p["logit"] for p in r["predictions"]}[label] for label in LABELS]
                        for r in printed])
        assert np.abs(got - expected).max() < FIDELITY, adapter
        answers[adapter] = got
    assert np.abs(answers["text"] - answers[""]).max() > 100 * FIDELITY


def test_the_class_embeddings_are_what_the_text_encoder_gives_for_the_adapters_prompts(ov_bank) -> None:
    """With an adapter's own classes as request-time labels, ``NAME_text`` answers what the
    adapter table holds: the two sides of one adapter agree."""
    repo, manifest = ov_bank["repo"], ov_bank["results"][3].manifest
    table, text = banks.session(repo / "ov_adapters" / "4"), _text_session(repo, 4)
    prompts = open_vocab.prompts(banks.CLASSES, TEMPLATES)
    for record in manifest.adapters:
        heads = open_vocab.label_embeddings(_embed(text, prompts, [record.slot] * len(prompts)), len(banks.CLASSES))
        stored = banks.table_entry(table, record.slot)[contract.CLASS_EMBEDS_NAME]
        assert np.abs(heads - stored).max() < 1e-5, record.adapter


def test_a_batch_mixing_slots_gives_each_row_its_own(ov_bank) -> None:
    manifest = ov_bank["results"][3].manifest
    session = _text_session(ov_bank["repo"], 4)
    slots = [r.slot for r in manifest.adapters] + [r.slot for r in manifest.retired]
    order = [slots[(i * 3) % len(slots)] for i in range(len(STRINGS))]
    strings = [STRINGS[i % 4] for i in range(len(STRINGS))]  # few strings, so one string meets many slots
    mixed = _embed(session, strings, order)
    alone = np.concatenate([_embed(session, [s], [slot]) for s, slot in zip(strings, order, strict=True)])
    assert np.abs(mixed - alone).max() < 1e-5
    # Not trivially equal: one string in the slots of text, both and the base answers three ways.
    same = _embed(session, [STRINGS[0]] * 3, [manifest.adapter(a).slot for a in ("text", "both", "base")])
    assert np.abs(same[:, None] - same[None]).max(axis=-1)[np.triu_indices(3, 1)].min() > 1e-3
    for slot in (-1, manifest.files.slots):
        with pytest.raises(Exception, match="out of data bounds|out of bounds"):
            _embed(session, STRINGS[:1], [slot])


def test_the_manifest_records_each_slots_text_check(ov_bank) -> None:
    results = ov_bank["results"]
    first = results[0].manifest.base_verification.text
    assert first is not None and first.passed and first.text_vs_base is None and not first.text_updates
    assert first.text_vs_reference.max_logit_error < first.tolerance_abs_logit and first.tokenizer_matches
    for result in results[1:4]:
        manifest = BankManifest.read(result.path / contract.MANIFEST_FILENAME)
        assert manifest == result.manifest and manifest.settings.open_vocabulary
        assert manifest.base_verification.text == first  # carried by every version
        added = [a for a in manifest.adapters if a.version_added == result.version]
        assert added
        for record in added:
            check = record.verification.text
            assert check is not None and check.passed and check.tokenizer_matches, record.adapter
            assert check.strings == len(banks.CLASSES) * len(TEMPLATES) + len(PROBE_STRINGS)
            assert check.text_vs_reference.max_logit_error < check.tolerance_abs_logit
            assert check.mixed_batch_max_logit_error is not None
            assert check.mixed_batch_max_logit_error < check.tolerance_abs_logit
            assert check.text_updates == ("text" in record.encoders), record.adapter
            moved = check.text_vs_base.max_logit_error
            assert moved > check.tolerance_abs_logit if check.text_updates else moved < 1e-5, (record.adapter, moved)


def _refused(repo: Path, match: str, action) -> None:
    before = banks.published_snapshot(repo)
    with pytest.raises(InvalidArgument, match=match):
        action()
    assert banks.published_snapshot(repo) == before, "a refused command changed the repository"


@pytest.mark.parametrize("layout,match", [
    (dict(encoder="text", position="top", params=("q", "o")),
     r"updates text block 11 o, a matrix the bank does not hold \(its --matrices are q,k,v.*--matrices q,k,v,o"),
    (dict(encoder="text", position="top", params=("q",), r=3), r"rank 3 \(text block 11 q\), above the bank's --max-rank 2"),
])
def test_a_text_update_the_bank_cannot_hold_is_refused_and_nothing_published(ov_bank, layout, match) -> None:
    root, repo = ov_bank["root"], ov_bank["repo"]
    lora = factories.write_paper_checkpoint(root / "refused.pt", seed=41, **layout)
    _refused(repo, match, lambda: add_adapters(repo, "ov", [AdapterSpec("refused", str(lora), ov_bank["classes"])]))


def test_a_bank_whose_manifest_predates_open_vocabulary_still_reads_and_takes_adapters(tmp_path, tiny_config) -> None:
    """A bank published before open vocabulary (its manifest without any text field, as
    tests/data/bank-manifests/bank-v2-before-open-vocabulary.json) reads, lists and takes
    an adapter with a text update (it lives in its class embeddings), and has no ``NAME_text``."""
    repo = tmp_path / "repo"
    classes = factories.write_classes(tmp_path / "classes.txt", banks.CLASSES)
    created = create_bank(BankOptions(name="old", model=str(tiny_config), pretrained=None, allow_random_weights=True,
                                      repository=repo, probes=1))
    path = created.path / contract.MANIFEST_FILENAME
    written = json.loads(path.read_text())
    old = json.loads((Path(__file__).parent / "data" / "bank-manifests" / "bank-v2-before-open-vocabulary.json").read_text())
    for record, before in ((written["settings"], old["settings"]), (written["files"], old["files"]),
                           (written["base_verification"], old["base_verification"])):
        for key in set(record) - set(before):
            del record[key]
    assert written.keys() == old.keys() and "open_vocabulary" not in written["settings"]
    path.write_text(json.dumps(written))
    assert BankManifest.read(path).settings.open_vocabulary is False
    lora = factories.write_paper_checkpoint(tmp_path / "t.pt", encoder="text", position="top", params=("q", "o"))
    added = add_adapters(repo, "old", [AdapterSpec("t", str(lora), classes)], probes=1)
    assert added.version == 2 and added.manifest.adapter("t").verification.text is None
    assert added.manifest.files.text is None and not (repo / "ov_text").exists() and not (repo / "old_text").exists()
    assert [a["adapter"] for a in list_adapters(repo, "old")] == ["base", "t"]
    factories.make_image(40, 30).save(image := tmp_path / "image.png")
    assert len(predict_files(repo, "old", [image], adapter="t")) == 1  # its classes: yes; labels: no
    with pytest.raises(FailedPrecondition, match="bank 'old' has no text encoder: request-time labels need a bank "
                                                 "created with --open-vocabulary"):
        predict_files(repo, "old", [image], labels=LABELS, adapter="t")
