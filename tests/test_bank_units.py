"""Adapter banks, the quick parts (no export): the companion graph, the contract's readers of
a bank's configs and table, the options, and how one adapter becomes a slot."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf.json_format import MessageToDict

from cliplora.core import contract
from cliplora.core.bank_manifest import BankSettingsRecord
from cliplora.core.errors import InvalidArgument
from cliplora.export import bank_cli, bank_companion
from cliplora.export.bank_config import adapters_config, bank_config
from cliplora.export.bank_options import (
    AdapterSpec,
    BankOptions,
    read_adapters_file,
    validate_adapter_id,
)
from cliplora.model.adapters import load_adapter
from cliplora.model.bank_adapters import adapter_shape, check_fits, slot_factors
from cliplora.model.merge import target_weight
from tests import factories

D = 4


def _companion() -> ort.InferenceSession:
    slots = [bank_companion.SlotClasses([], np.zeros((0, D), np.float32)),
             bank_companion.SlotClasses(["chat", "hund"], np.full((2, D), 0.5, np.float32)),
             bank_companion.SlotClasses(["é", "b", "c"], np.arange(3 * D, dtype=np.float32).reshape(3, D))]
    table = [{"adapter": "base"}, {"adapter": "x"}, {"adapter": "y"}]
    model = bank_companion.build(slots, table, D)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ask(session: ort.InferenceSession, slot: int) -> list[np.ndarray]:
    return session.run(None, {contract.BANK_ADAPTER_NAME: np.array([slot], np.int32)})


def test_companion_answers_each_slots_classes_padded_to_the_largest() -> None:
    session = _companion()
    names = [o.name for o in session.get_outputs()]
    assert names == [contract.CLASS_EMBEDS_NAME, contract.CLASS_COUNT_NAME, contract.CLASS_NAMES_NAME,
                     contract.ADAPTER_TABLE_NAME]
    embeds, count, labels, table = _ask(session, 1)
    assert embeds.shape == (3, D) and list(count) == [2] and list(labels) == ["chat", "hund", ""]
    assert (embeds[:2] == 0.5).all() and not embeds[2].any()
    embeds, count, labels, _ = _ask(session, 2)
    assert list(count) == [3] and list(labels) == ["é", "b", "c"] and embeds[2, 3] == 11
    embeds, count, labels, base_table = _ask(session, 0)
    assert list(count) == [0] and not embeds.any() and list(labels) == ["", "", ""]
    assert base_table[0] == table[0] and json.loads(table[0])[1] == {"adapter": "x"}


@pytest.mark.parametrize("slot", [-1, 3, 2**31 - 1])
def test_companion_refuses_a_slot_it_does_not_have(slot: int) -> None:
    with pytest.raises(Exception, match="out of data bounds"):
        _ask(_companion(), slot)


def test_companion_slots_read_back(tmp_path: Path) -> None:
    slots = [bank_companion.SlotClasses(["a"], np.ones((1, D), np.float32)),
             bank_companion.SlotClasses([], np.zeros((0, D), np.float32)),
             bank_companion.SlotClasses(["ß", "c"], np.eye(2, D, dtype=np.float32))]
    bank_companion.write(bank_companion.build(slots, [{"adapter": "base"}], D), tmp_path)
    back = bank_companion.read_slots(tmp_path)
    assert [list(s.names) for s in back] == [["a"], [], ["ß", "c"]]
    assert all(np.array_equal(a.embeddings, b.embeddings) for a, b in zip(slots, back, strict=True))


def _settings(**overrides: object) -> BankSettingsRecord:
    values = dict(max_rank=4, matrices=["q", "v", "o"], target="portable", precision="fp32", max_batch_size=8,
                  image_size=32, embedding_dim=24, logit_scale=14.3, vision_blocks=12)
    return BankSettingsRecord(**{**values, **overrides})


def test_the_gateway_reads_a_banks_configs_through_the_contract() -> None:
    bank = MessageToDict(bank_config("shop", _settings()), preserving_proto_field_name=True)
    shape = contract.bank_shape("shop", bank)
    assert (shape.image_size, shape.embedding_dim, shape.max_batch_size) == (32, 24, 8)
    assert (shape.adapters_model, shape.max_rank, shape.matrices, shape.logit_scale) == \
        ("shop_adapters", 4, ("q", "v", "o"), 14.3)
    assert contract.is_bank(bank) and bank["version_policy"]["latest"]["num_versions"] == 1
    table = MessageToDict(adapters_config("shop", 24), preserving_proto_field_name=True)
    assert contract.adapters_model_shape("shop_adapters", table) == 24 and not contract.is_bank(table)
    assert table["version_policy"]["latest"]["num_versions"] == 2
    with pytest.raises(ValueError, match="not a cliplora adapter bank"):
        contract.bank_shape("shop_adapters", table)
    with pytest.raises(ValueError, match="adapters_model="):
        contract.bank_shape("other", bank)  # the companion's name must be the bank's own
    with pytest.raises(ValueError, match="not the adapter table"):
        contract.adapters_model_shape("shop", bank)


def test_adapter_table_reader() -> None:
    row = {"adapter": "base", "slot": 0, "num_classes": 2, "rank": 0, "matrices": [], "encoders": [],
           "lora_sha256": "", "version_added": 1, "templates": ["a {}."]}
    other = {**row, "adapter": "x", "slot": 3, "rank": 2, "matrices": ["q"], "encoders": ["vision"]}
    rows = contract.read_adapter_table(json.dumps([row, other]).encode())
    assert rows[1].slot == 3 and rows[1].matrices == ("q",) and rows[0].templates == ("a {}.",)
    for bad in (b"[]", json.dumps([other]).encode(), b"{", json.dumps([{**row, "extra": 1}]).encode()):
        with pytest.raises(ValueError):
            contract.read_adapter_table(bad)


@pytest.mark.parametrize("overrides,match", [
    (dict(max_rank=0), "--max-rank must be"),
    (dict(matrices=("q", "x")), "--matrices must list"),
    (dict(matrices=("q", "q")), "--matrices must list"),
    (dict(matrices=()), "--matrices must list"),
    (dict(name="n" * 56), "at most 55 characters"),
    (dict(name="../up"), "invalid model name"),
    (dict(target="tpu"), "--target must be"),
])
def test_bank_options_are_checked(overrides: dict, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        BankOptions(**{"name": "bank", "model": "m", "pretrained": None, **overrides})


def test_adapter_ids_and_the_adapters_file(tmp_path: Path) -> None:
    assert validate_adapter_id("shop-7_b") == "shop-7_b"
    for bad, match in (("base", "reserved"), ("a b", "invalid adapter id"), ("", "invalid adapter id")):
        with pytest.raises(InvalidArgument, match=match):
            validate_adapter_id(bad)
    path = tmp_path / "sub" / "adapters.json"
    path.parent.mkdir()
    path.write_text(json.dumps([{"adapter": "a", "lora": "a.pt", "classes": "c.txt", "template": ["x {}"]}]))
    (spec,) = read_adapters_file(path)
    assert spec == AdapterSpec("a", str(path.parent / "a.pt"), path.parent / "c.txt", ("x {}",))
    for bad in ([], [{"adapter": "a"}], [{"adapter": "a", "lora": "l", "classes": "c", "extra": 1}],
                [{"adapter": "a", "lora": "l", "classes": "c", "template": "one"}]):
        path.write_text(json.dumps(bad))
        with pytest.raises(InvalidArgument, match="--adapters-file"):
            read_adapters_file(path)


def test_bank_add_takes_one_adapter_or_a_file() -> None:
    parser = argparse.ArgumentParser()
    bank_cli.add_arguments(parser)
    both = parser.parse_args(["add", "b", "--adapter", "a", "--adapters-file", "f.json"])
    with pytest.raises(InvalidArgument, match="--adapters-file goes alone"):
        bank_cli.specs(both)
    with pytest.raises(InvalidArgument, match="needs --adapter, --lora and --classes"):
        bank_cli.specs(parser.parse_args(["add", "b", "--adapter", "a", "--lora", "l.pt"]))
    (spec,) = bank_cli.specs(parser.parse_args(["add", "b", "--adapter", "a", "--lora", "l.pt", "--classes", "c",
                                                "--template", "t {}"]))
    assert spec == AdapterSpec("a", "l.pt", Path("c"), ("t {}",))


def test_a_slot_holds_the_vision_updates_scaled_and_zero_padded(tmp_path: Path, tiny_base) -> None:
    path = factories.write_paper_checkpoint(tmp_path / "a.pt", encoder="both", position="top2", params=("q", "o"),
                                            r=2, alpha=3.0)
    adapter = load_adapter(str(path), 12, 12)
    check_fits(adapter, tiny_base.model, ("q", "k", "v", "o"), 5, "a")
    slot = slot_factors(adapter, tiny_base.model, ("q", "k", "v", "o"), 5)
    assert len(slot) == 12 * 4 * 2 and adapter_shape(adapter).encoders == ("text", "vision")
    update = next(u for u in adapter.updates if (u.tower, u.block, u.target) == ("vision", 11, "o"))
    a, b = slot["bank.block11.o.a"], slot["bank.block11.o.b"]
    assert a.shape == (5, factories.VISION_WIDTH) and b.shape == (factories.VISION_WIDTH, 5)
    delta = torch.from_numpy(b) @ torch.from_numpy(a)  # the padded product is the update itself
    assert torch.allclose(delta, update.delta(), atol=1e-6) and update.scale == pytest.approx(3 / math.sqrt(2))
    assert not slot["bank.block0.q.a"].any() and not slot["bank.block10.v.b"].any()  # untouched: zeros
    assert target_weight(tiny_base.model, "vision", 11, "o").shape == (factories.VISION_WIDTH,) * 2


@pytest.mark.parametrize("edit,matrices,rank,match", [
    (None, ("q", "k", "v"), 2, r"updates vision block 11 o, a matrix the bank does not hold"),
    (None, ("q", "k", "v", "o"), 1, r"rank 2 .* above the bank's --max-rank 1"),
    ("nan", ("q", "k", "v", "o"), 2, "not finite"),
    ("inf-scale", ("q", "k", "v", "o"), 2, "not finite"),
])
def test_what_a_bank_cannot_hold_is_refused_by_name(tmp_path: Path, tiny_base, edit, matrices, rank, match) -> None:
    raw = factories.paper_checkpoint(encoder="vision", position="top", params=("q", "o"))
    if edit == "nan":
        raw["weights"]["layer_0"]["proj"]["w_lora_A"][1, 2] = float("nan")
    elif edit == "inf-scale":
        raw["metadata"]["alpha"] = 1e38
        raw["weights"]["layer_0"]["q_proj"]["w_lora_B"].fill_(1e3)
    torch.save(raw, tmp_path / "a.pt")
    adapter = load_adapter(str(tmp_path / "a.pt"), 12, 12)
    with pytest.raises(InvalidArgument, match=match):
        check_fits(adapter, tiny_base.model, matrices, rank, "adapter 'a'")


def test_an_adapters_rank_is_its_largest_update_rank(tmp_path: Path) -> None:
    folder = factories.write_peft_adapter(tmp_path / "peft", modules=(("vision", 0, "q"), ("vision", 5, "v")), r=2,
                                          rank_pattern={"vision_model.encoder.layers.5.self_attn.v_proj": 6})
    shape = adapter_shape(load_adapter(str(folder), 12, 12))
    assert (shape.rank, shape.matrices, shape.encoders) == (6, ("q", "v"), ("vision",))
