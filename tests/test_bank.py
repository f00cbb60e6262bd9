"""Adapter banks in ONNX Runtime: every adapter layout goes in and answers as its own merged
model, mixed batches, the refusals, versions that share their base weights, the targets.

Through the real Triton: tests/test_bank_serving.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cliplora.core import contract
from cliplora.core.bank_manifest import BankManifest
from cliplora.core.errors import FailedPrecondition, InvalidArgument, NotFound
from cliplora.export import bank_store
from cliplora.export.bank_create import create_bank
from cliplora.export.bank_options import AdapterSpec, BankOptions, read_adapters_file
from cliplora.export.bank_update import add_adapters, list_adapters, remove_adapter
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.model import head
from tests import banks, factories

pytestmark = pytest.mark.slow  # every test here exports banks (seconds each); quick checks: test_bank_units.py
TOLERANCE = 1e-5  # ONNX Runtime against PyTorch, fp32, on unit embeddings of the tiny model


def _create(root: Path, name: str, config: Path, **options: object):
    return create_bank(BankOptions(name=name, model=str(config), pretrained=None, allow_random_weights=True,
                                   repository=root / "repo", **options))


@pytest.fixture(scope="module")
def every_bank(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path):
    """A q,k,v,o bank of max rank 16 holding every layout, added in one version by an --adapters-file."""
    root = tmp_path_factory.mktemp("every-bank")
    classes = factories.write_classes(root / "classes.txt", banks.CLASSES)
    loras = {adapter_id: banks.write_paper(root, adapter_id, seed) for seed, adapter_id in enumerate(banks.PAPER_LAYOUTS)}
    loras["peft-rank-pattern"] = banks.write_peft(root)
    loras["finetune-output"] = banks.write_finetune_output(root / "finetune-lora.pt", tiny_config)
    _create(root, "every", tiny_config, classes=classes, matrices=("q", "k", "v", "o"), max_rank=16)
    adapters_file = banks.write_adapters_file(root / "adapters.json", [(a, p, classes) for a, p in loras.items()])
    result = add_adapters(root / "repo", "every", read_adapters_file(adapters_file))
    return root, result, loras


@pytest.fixture(scope="module")
def small_bank(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path):
    """A default bank (q,k,v, rank 2) with one adapter, for the refusals."""
    root = tmp_path_factory.mktemp("small-bank")
    classes = factories.write_classes(root / "classes.txt", banks.CLASSES)
    _create(root, "small", tiny_config)
    lora = factories.write_paper_checkpoint(root / "a1.pt", encoder="both", position="all", params=("q", "v"))
    add_adapters(root / "repo", "small", [AdapterSpec("a1", str(lora), classes)])
    return root, classes


def test_every_layout_goes_in_and_answers_as_its_merged_model(every_bank, tiny_base) -> None:
    root, result, loras = every_bank
    manifest = result.manifest
    assert result.version == 2 and [a.adapter for a in manifest.adapters] == ["base", *loras]
    bank, companion = banks.session(result.path), banks.session(root / "repo" / "every_adapters" / "2")
    crops = banks.images(3)
    base = banks.merged_embeds(tiny_base, None, crops)
    assert np.abs(banks.bank_embeds(bank, crops, [0] * 3) - base).max() < TOLERANCE
    base_text = banks.table_entry(companion, 0)[contract.CLASS_EMBEDS_NAME]
    for record in manifest.adapters[1:]:
        lora = loras[record.adapter]
        assert record.verification is not None and record.verification.passed, record.adapter
        assert record.verification.bank_vs_reference.max_abs_logit < 1e-3
        expected = banks.merged_embeds(tiny_base, lora, crops)
        got = banks.bank_embeds(bank, crops, [record.slot] * 3)
        assert np.abs(got - expected).max() < TOLERANCE, record.adapter
        entry = banks.table_entry(companion, record.slot)
        assert list(entry[contract.CLASS_COUNT_NAME]) == [len(banks.CLASSES)]
        if "vision" in record.encoders:  # the adapter is applied to the image tower: the answer changes
            assert np.abs(got - base).max() > 1e-3, record.adapter
        if "text" in record.encoders:  # its class embeddings come from its own text tower
            assert np.abs(entry[contract.CLASS_EMBEDS_NAME] - base_text).max() > 1e-3, record.adapter
        else:
            assert np.abs(entry[contract.CLASS_EMBEDS_NAME] - base_text).max() < TOLERANCE


def test_ranks_are_the_adapters_own_and_padded_exactly(every_bank) -> None:
    root, result, loras = every_bank
    rows = {r["adapter"]: r for r in list_adapters(root / "repo", "every")}
    assert rows["vis-all-qkvo-r1"]["rank"] == 1 and rows["both-halfup-ko-r16"]["rank"] == 16
    assert rows["peft-rank-pattern"]["rank"] == 6  # rank_pattern: the largest of its ranks
    assert rows["txt-top2-qv"]["matrices"] == ["q", "v"] and rows["vis-top-o"]["matrices"] == ["o"]
    stacks = bank_store.read_stacks(result.path)
    slot = next(a.slot for a in result.manifest.adapters if a.adapter == "vis-all-qkvo-r1")
    a, b = stacks["bank.block3.o.a"][slot], stacks["bank.block3.o.b"][slot]
    assert a.shape == (16, factories.VISION_WIDTH) and b.shape == (factories.VISION_WIDTH, 16)
    assert np.abs(a[:1]).max() > 0 and not a[1:].any() and not b[:, 1:].any()  # rank 1 padded with zeros


def test_a_batch_mixing_adapters_equals_each_sample_alone(every_bank) -> None:
    _, result, _ = every_bank
    bank = banks.session(result.path)
    slots = [a.slot for a in result.manifest.adapters]
    order = [slots[(i * 5) % len(slots)] for i in range(2 * len(slots))]  # every slot, shuffled, twice
    crops = banks.images(len(order), seed=11)
    mixed = banks.bank_embeds(bank, crops, order)
    alone = np.concatenate([banks.bank_embeds(bank, crops[i : i + 1], [slot]) for i, slot in enumerate(order)])
    assert np.abs(mixed - alone).max() < TOLERANCE
    # Not trivially equal: the same image answers differently in the base and every slot whose
    # adapter changes the image tower (a text-only adapter changes its class embeddings only).
    vision = [0, *(a.slot for a in result.manifest.adapters if "vision" in a.encoders)]
    assert len(vision) > 10
    same = banks.bank_embeds(bank, np.repeat(crops[:1], len(vision), axis=0), vision)
    distances = np.abs(same[:, None] - same[None]).max(axis=-1)
    assert (distances + np.eye(len(vision)) > 1e-4).all()


def test_bank_logits_equal_each_adapters_own_merged_export(every_bank, tiny_config) -> None:
    root, result, loras = every_bank
    companion = banks.session(root / "repo" / "every_adapters" / "2")
    crops = banks.images(4, seed=5)
    scale = result.manifest.settings.logit_scale
    for adapter_id in ("both-top3-qkv-r4", "peft-rank-pattern", "txt-top2-qv"):
        exported = run_export(ExportOptions(
            model=str(tiny_config), pretrained=None, lora=str(loras[adapter_id]), classes=root / "classes.txt",
            templates=("a photo of a {}.",), name=f"export-{adapter_id}", repository=root / "exports",
            allow_random_weights=True, probes=2))
        expected = banks.session(exported.path).run([contract.OUTPUT_NAME], {contract.INPUT_NAME: crops})[0]
        record = result.manifest.adapter(adapter_id)
        embeds = banks.bank_embeds(banks.session(result.path), crops, [record.slot] * len(crops))
        class_embeds = banks.table_entry(companion, record.slot)[contract.CLASS_EMBEDS_NAME]
        logits = scale * embeds @ class_embeds.T
        assert np.abs(logits - expected).max() < 1e-4, adapter_id
        base_logits = scale * banks.bank_embeds(banks.session(result.path), crops, [0] * 4) @ \
            banks.table_entry(companion, 0)[contract.CLASS_EMBEDS_NAME].T
        assert np.abs(base_logits - expected).max() > 1e-3, adapter_id  # the export is not the base either


def _refused(root: Path, error: type, match: str, action) -> None:
    before = banks.published_snapshot(root / "repo")
    with pytest.raises(error, match=match):
        action()
    assert banks.published_snapshot(root / "repo") == before, "a refused command changed the repository"


@pytest.mark.parametrize("case,error,match", [
    ("rank", InvalidArgument, r"rank 4 .* above the bank's --max-rank 2"),
    ("o-matrix", InvalidArgument, r"updates vision block 11 o, a matrix the bank does not hold .* --matrices q,k,v,o"),
    ("shape", InvalidArgument, r"does not fit the base model"),
    ("non-finite", InvalidArgument, r"not finite"),
    ("no-op", FailedPrecondition, r"no-op adapter"),
    ("bad-id", InvalidArgument, r"invalid adapter id"),
    ("base-id", InvalidArgument, r"'base' is reserved"),
    ("none", InvalidArgument, r"--lora none adds nothing"),
    ("twice", InvalidArgument, r"give each adapter once"),
    ("one-bad-of-two", InvalidArgument, r"rank 4"),
])
def test_an_adapter_the_bank_cannot_hold_is_refused_and_nothing_published(small_bank, case, error, match) -> None:
    root, classes = small_bank
    good = factories.write_paper_checkpoint(root / "good.pt", encoder="vision", position="top", params=("q",))
    raw = factories.paper_checkpoint(encoder="vision", position="top", params=("q",))
    if case == "rank":
        lora = factories.write_paper_checkpoint(root / "r4.pt", encoder="vision", position="top", params=("q",), r=4)
    elif case == "o-matrix":
        lora = factories.write_paper_checkpoint(root / "o.pt", encoder="vision", position="top", params=("q", "o"))
    elif case == "shape":  # an adapter for a wider model
        raw["weights"]["layer_0"]["q_proj"]["w_lora_A"] = torch.randn(2, factories.VISION_WIDTH * 2)
        torch.save(raw, lora := root / "wide.pt")
    elif case == "non-finite":
        raw["weights"]["layer_0"]["q_proj"]["w_lora_B"][0, 0] = float("nan")
        torch.save(raw, lora := root / "nan.pt")
    elif case == "no-op":  # the paper's initialisation: lora_B all zero
        raw["weights"]["layer_0"]["q_proj"]["w_lora_B"].zero_()
        torch.save(raw, lora := root / "zero.pt")
    else:
        lora = good
    specs = {
        "bad-id": [AdapterSpec("no/slash", str(lora), classes)],
        "base-id": [AdapterSpec("base", str(lora), classes)],
        "none": [AdapterSpec("x", "none", classes)],
        "twice": [AdapterSpec("x", str(lora), classes), AdapterSpec("x", str(lora), classes)],
        "one-bad-of-two": [AdapterSpec("fine", str(good), classes), AdapterSpec("bad", str(
            factories.write_paper_checkpoint(root / "r4b.pt", encoder="vision", position="top", params=("q",), r=4)),
            classes)],
    }.get(case, [AdapterSpec("new", str(lora), classes)])
    _refused(root, error, match, lambda: add_adapters(root / "repo", "small", specs))


def test_names_a_bank_cannot_take_or_give_are_refused(small_bank, tiny_config) -> None:
    root, classes = small_bank
    export = dict(model=str(tiny_config), pretrained=None, lora="none", classes=classes, templates=(),
                  repository=root / "repo", allow_random_weights=True, probes=1)
    run_export(ExportOptions(name="plain", **export))
    _refused(root, FailedPrecondition, r"already has 'plain', a model that is not a bank",
             lambda: _create(root, "plain", tiny_config))
    _refused(root, FailedPrecondition, r"already has 'small', a bank",
             lambda: _create(root, "small", tiny_config))
    _refused(root, FailedPrecondition, r"'small' is an adapter bank|already has 'small', an adapter bank",
             lambda: run_export(ExportOptions(name="small", **export)))
    _refused(root, FailedPrecondition, r"is the adapter table of the bank 'small'",
             lambda: run_export(ExportOptions(name="small_adapters", **export)))
    run_export(ExportOptions(name="taken_adapters", **export))
    _refused(root, FailedPrecondition, r"'taken_adapters', the name the adapter table of bank 'taken' needs",
             lambda: _create(root, "taken", tiny_config))
    _refused(root, FailedPrecondition, r"not an adapter bank",
             lambda: add_adapters(root / "repo", "plain", [AdapterSpec("a", "x", classes)]))
    _refused(root, NotFound, r"no bank 'nowhere'", lambda: list_adapters(root / "repo", "nowhere"))
    _refused(root, NotFound, r"has no adapter 'ghost'", lambda: remove_adapter(root / "repo", "small", "ghost"))


def test_bank_add_refuses_a_base_whose_files_changed(tmp_path, tiny_config) -> None:
    config = Path(tmp_path / "model.json")
    config.write_bytes(tiny_config.read_bytes())
    _create(tmp_path, "moved", config)
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "embed_dim": 32}, indent=1))  # same model, other bytes
    classes = factories.write_classes(tmp_path / "classes.txt", banks.CLASSES)
    lora = factories.write_paper_checkpoint(tmp_path / "a.pt", encoder="vision", position="top", params=("q",))
    _refused(tmp_path, FailedPrecondition, r"model config .* changed since `bank create`",
             lambda: add_adapters(tmp_path / "repo", "moved", [AdapterSpec("a", str(lora), classes)]))


def test_add_replace_remove_make_versions_that_share_the_base_weights(tmp_path, tiny_config, tiny_base) -> None:
    classes = factories.write_classes(tmp_path / "classes.txt", banks.CLASSES)
    first = factories.write_paper_checkpoint(tmp_path / "v1.pt", encoder="both", position="all", seed=1)
    second = factories.write_paper_checkpoint(tmp_path / "v2.pt", encoder="vision", position="all", seed=2)
    repo = tmp_path / "repo"
    _create(tmp_path, "life", tiny_config)
    added = add_adapters(repo, "life", [AdapterSpec("shop", str(first), classes)])
    replaced = add_adapters(repo, "life", [AdapterSpec("shop", str(second), classes)])
    removed = remove_adapter(repo, "life", "shop")
    assert [r.version for r in (added, replaced, removed)] == [2, 3, 4]
    inodes = {os.stat(repo / "life" / str(v) / contract.BANK_BASE_WEIGHTS_FILENAME).st_ino for v in (1, 2, 3, 4)}
    assert len(inodes) == 1, "every version hard-links the first version's base weights"
    assert os.stat(repo / "life" / "4" / contract.BANK_FACTORS_FILENAME).st_ino != \
        os.stat(repo / "life" / "3" / contract.BANK_FACTORS_FILENAME).st_ino
    old, new = added.manifest.adapter("shop").slot, replaced.manifest.adapter("shop").slot
    assert (old, new) == (1, 2)  # a replaced adapter gets a new slot; the old one is never reused
    assert [(r.slot, r.adapter, r.version_retired) for r in removed.manifest.retired] == [(1, "shop", 3), (2, "shop", 4)]
    crops = banks.images(2)
    base = banks.merged_embeds(tiny_base, None, crops)
    v3, v3_table = banks.session(replaced.path), banks.session(repo / "life_adapters" / "3")
    assert np.abs(banks.bank_embeds(v3, crops, [new] * 2) - banks.merged_embeds(tiny_base, second, crops)).max() < TOLERANCE
    # The replaced content answers nowhere: its old slot is the base, with no classes.
    assert np.abs(banks.bank_embeds(v3, crops, [old] * 2) - base).max() < TOLERANCE
    assert np.abs(banks.merged_embeds(tiny_base, first, crops) - base).max() > 1e-3
    assert list(banks.table_entry(v3_table, old)[contract.CLASS_COUNT_NAME]) == [0]
    table = contract.read_adapter_table(banks.table_entry(v3_table, 0)[contract.ADAPTER_TABLE_NAME][0])
    assert [(r.adapter, r.slot, r.version_added) for r in table] == [("base", 0, 1), ("shop", 2, 3)]
    assert [a["adapter"] for a in list_adapters(repo, "life")] == ["base"]
    v4 = banks.session(removed.path)
    assert np.abs(banks.bank_embeds(v4, crops, [new] * 2) - base).max() < TOLERANCE
    with pytest.raises(Exception, match="out of data bounds"):  # not Gather's wrap-around to the last slot
        banks.bank_embeds(v4, crops[:1], [-1])


def test_slots_out_of_range_are_refused_not_wrapped(every_bank) -> None:
    root, result, _ = every_bank
    bank, companion = banks.session(result.path), banks.session(root / "repo" / "every_adapters" / "2")
    slots = result.manifest.files.slots
    for slot in (-1, slots):
        with pytest.raises(Exception, match="out of data bounds|out of bounds"):
            banks.bank_embeds(bank, banks.images(1), [slot])
        with pytest.raises(Exception, match="out of data bounds|out of bounds"):
            banks.table_entry(companion, slot)


def test_cpu_int8_bank_quantizes_the_base_and_gates_each_adapter(tmp_path, tiny_config) -> None:
    classes = factories.write_classes(tmp_path / "classes.txt", banks.CLASSES)
    lora = factories.write_paper_checkpoint(tmp_path / "a.pt", encoder="both", position="all")
    _create(tmp_path, "cpu", tiny_config, target="cpu-int8", classes=classes)
    result = add_adapters(tmp_path / "repo", "cpu", [AdapterSpec("a", str(lora), classes)])
    gate = result.manifest.adapter("a").verification.int8_gate
    assert gate is not None and gate.passed and 0 < gate.max_abs_logit <= gate.tolerance_abs_logit
    assert result.manifest.base_verification.int8_gate.passed
    graph = bank_store.load_graph(result.path)
    assert "MatMulInteger" in {n.op_type for n in graph.graph.node}
    stacks = bank_store.stack_initializers(graph)
    assert stacks and {t.data_type for t in stacks.values()} == {onnx.TensorProto.FLOAT}  # the branches stay fp32
    config = (tmp_path / "repo" / "cpu" / contract.CONFIG_FILENAME).read_text()
    assert "KIND_CPU" in config and 'string_value: "int8"' in config


def test_gpu_bank_writes_tensorrt_for_both_inputs_and_keys_each_version(tmp_path, tiny_config) -> None:
    classes = factories.write_classes(tmp_path / "classes.txt", banks.CLASSES)
    lora = factories.write_paper_checkpoint(tmp_path / "a.pt", encoder="vision", position="all")
    first = _create(tmp_path, "gpu", tiny_config, target="gpu")
    second = add_adapters(tmp_path / "repo", "gpu", [AdapterSpec("a", str(lora), classes)])
    keys = [r.manifest.files.tensorrt_engine_key for r in (first, second)]
    assert all(keys) and keys[0] != keys[1]
    names = [{t.name for t in bank_store.load_graph(r.path).graph.initializer} for r in (first, second)]
    assert any(name.endswith(f"#{keys[1]}") for name in names[1]) and not any(keys[0] in n for n in names[1])
    config = (tmp_path / "repo" / "gpu" / contract.CONFIG_FILENAME).read_text()
    assert "trt_profile_min_shapes" in config and f"{contract.BANK_ADAPTER_NAME}:1x1" in config
    assert config.count(f'key: "{contract.BANK_ADAPTER_NAME}"') == 2  # in both warm-ups
    assert second.manifest.gpu_serving is not None and not second.manifest.gpu_serving.verified_here


def test_manifest_records_each_adapter_and_reads_back(every_bank) -> None:
    _, result, loras = every_bank
    manifest = BankManifest.read(result.path / contract.MANIFEST_FILENAME)
    assert manifest == result.manifest and manifest.version == 2
    record = manifest.adapter("peft-rank-pattern")
    assert record.lora.format == "peft" and record.version_added == 2 and record.lora_sha256
    assert record.classes == banks.CLASSES and record.templates == [head.DEFAULT_TEMPLATE]
