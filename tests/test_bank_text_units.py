"""A bank's text side (``NAME_text``), the quick parts (no export): the graph in PyTorch
against the model library's merge, one adapter's text factors, the refusals, the configs
the gateway reads, the unmerged text reference, the verification's verdicts, the records.

Exported and published: tests/test_bank_text.py; served: tests/test_bank_text_triton.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf.json_format import MessageToDict

from cliplora.core import contract
from cliplora.core.bank_manifest import (
    BankManifest,
    BankSettingsRecord,
    BankTextVerificationRecord,
    EmbeddingComparisonRecord,
)
from cliplora.core.errors import InvalidArgument
from cliplora.core.tokenizer import get_tokenizer
from cliplora.export import bank_text_verify, bank_verify
from cliplora.export.bank_config import bank_config, bank_text_config
from cliplora.export.open_vocabulary import tokenizer_record
from cliplora.model.adapters import load_adapter
from cliplora.model.bank_adapters import check_fits, slot_factors
from cliplora.model.bank_text_graph import BankTextGraph, text_stack_name
from cliplora.model.lora import LoraAdapter
from cliplora.model.merge import merge_adapter
from cliplora.model.reference import LoraAttention
from tests import factories

DATA = Path(__file__).parent / "data" / "bank-manifests"
STRINGS = ["a photo of a cat.", "a red panda", "", "東京タワーの写真", " ".join(["long"] * 90)]


def _settings(**overrides: object) -> BankSettingsRecord:
    values = dict(max_rank=4, matrices=["q", "v", "o"], target="portable", precision="fp32", max_batch_size=8,
                  image_size=32, embedding_dim=24, logit_scale=14.3, vision_blocks=12, open_vocabulary=True,
                  tokenizer=tokenizer_record(get_tokenizer()))
    return BankSettingsRecord(**{**values, **overrides})


def _json(config) -> dict:
    return MessageToDict(config, preserving_proto_field_name=True)


def _adapter(tmp_path: Path, name: str = "a", **layout: object) -> LoraAdapter:
    path = factories.write_paper_checkpoint(tmp_path / f"{name}.pt", **layout)
    return load_adapter(str(path), factories.BLOCKS, factories.BLOCKS)


def _graph_with(model: torch.nn.Module, slots: list[dict[str, np.ndarray]], matrices: tuple[str, ...],
                rank: int) -> BankTextGraph:
    """A text graph whose stacks hold `slots` (what a bank version's factors file holds)."""
    graph = BankTextGraph(model, matrices, rank)
    for name, stack in graph.stacks().items():
        stack.data = torch.from_numpy(np.stack([slot[name] for slot in slots]))
    return graph.eval()


@torch.no_grad()
def _encode(model: torch.nn.Module, tokenizer: object, strings: list[str]) -> torch.Tensor:
    return F.normalize(model.encode_text(tokenizer(strings)), dim=-1)


@torch.no_grad()
def test_each_slot_of_the_text_graph_is_its_adapters_merged_text_tower(tmp_path: Path, tiny_base) -> None:
    matrices, towers = ("q", "k", "v", "o"), ("vision", "text")
    both = _adapter(tmp_path, "both", encoder="both", position="half-up", params=("k", "o"), r=3, seed=1)
    vision = _adapter(tmp_path, "vision", encoder="vision", position="all", params=("q", "v"), seed=2)
    text = _adapter(tmp_path, "text", encoder="text", position="top3", params=("q", "k", "v", "o"), seed=3)
    adapters = [None, both, vision, text]
    slots = [{k: v for k, v in slot_factors(a, tiny_base.model, matrices, 4, towers).items()
              if k.startswith("bank_text.")} for a in adapters]
    graph = _graph_with(tiny_base.model, slots, matrices, 4)
    tokens = tiny_base.tokenizer(STRINGS)
    base = _encode(tiny_base.model, tiny_base.tokenizer, STRINGS)
    for slot, adapter in enumerate(adapters):
        got = graph(tokens.int(), torch.full((len(STRINGS), 1), slot, dtype=torch.int32))
        expected = base if adapter is None else _encode(merge_adapter(tiny_base.model, adapter)[0],
                                                        tiny_base.tokenizer, STRINGS)
        assert (got - expected).abs().max() < 1e-5, slot
        if adapter is not None and any(u.tower == "text" for u in adapter.updates):
            assert (got - base).abs().max() > 1e-3, slot  # not trivially the base
    order = [3, 0, 1, 2, 3]  # one batch mixing slots: each row its own slot's
    mixed = graph(tokens.int(), torch.tensor(order, dtype=torch.int32).reshape(-1, 1))
    alone = torch.cat([graph(tokens[i : i + 1].int(), torch.tensor([[s]], dtype=torch.int32))
                       for i, s in enumerate(order)])
    assert (mixed - alone).abs().max() < 1e-6 and (mixed[0] - mixed[4]).abs().max() > 1e-3
    with pytest.raises(IndexError):  # a negative slot is sent past the stacks, not wrapped to the last
        graph(tokens[:1].int(), torch.tensor([[-1]], dtype=torch.int32))


def test_a_slot_holds_the_text_updates_only_with_open_vocabulary(tmp_path: Path, tiny_base) -> None:
    adapter = _adapter(tmp_path, encoder="both", position="top", params=("q",), r=2, alpha=3.0)
    vision_only = slot_factors(adapter, tiny_base.model, ("q", "v"), 4)
    both = slot_factors(adapter, tiny_base.model, ("q", "v"), 4, ("vision", "text"))
    assert not any(name.startswith("bank_text.") for name in vision_only)
    assert set(both) - set(vision_only) == {text_stack_name(b, m, f) for b in range(12) for m in "qv" for f in "ab"}
    update = next(u for u in adapter.updates if u.tower == "text")
    a, b = both[text_stack_name(11, "q", "a")], both[text_stack_name(11, "q", "b")]
    assert a.shape == (4, factories.TEXT_WIDTH) and b.shape == (factories.TEXT_WIDTH, 4)
    assert torch.allclose(torch.from_numpy(b) @ torch.from_numpy(a), update.delta(), atol=1e-6)
    assert not a[2:].any() and not b[:, 2:].any() and not both[text_stack_name(10, "q", "a")].any()


def test_text_updates_on_matrices_the_bank_does_not_hold_are_refused_with_open_vocabulary(
        tmp_path: Path, tiny_base) -> None:
    adapter = _adapter(tmp_path, encoder="text", position="top", params=("q", "k"))
    check_fits(adapter, tiny_base.model, ("q", "v"), 2, "adapter 'a'")  # without: they live in its class embeddings
    with pytest.raises(InvalidArgument, match=r"updates text block 11 k, a matrix the bank does not hold "
                                              r"\(its --matrices are q,v \(a bank with open vocabulary.*"
                                              r"--matrices q,k,v for it"):
        check_fits(adapter, tiny_base.model, ("q", "v"), 2, "adapter 'a'", ("vision", "text"))
    deep = _adapter(tmp_path, "r3", encoder="text", position="top", params=("q",), r=3)
    with pytest.raises(InvalidArgument, match=r"rank 3 \(text block 11 q\), above the bank's --max-rank 2"):
        check_fits(deep, tiny_base.model, ("q", "v"), 2, "adapter 'r3'", ("vision", "text"))


def test_the_gateway_reads_a_banks_text_side_through_the_contract() -> None:
    settings = _settings()
    bank = _json(bank_config("shop", settings))
    assert contract.parameter(bank, contract.PARAM_TEXT_MODEL) == "shop_text"
    assert contract.parameter(bank, contract.PARAM_VOCAB_SHA256) == get_tokenizer().vocab_sha256
    text = _json(bank_text_config("shop", settings))
    assert contract.is_bank_text_model(text) and contract.is_text_model(text) and not contract.is_bank(text)
    shape = contract.text_shape("shop_text", text)
    assert (shape.context_length, shape.embedding_dim, shape.max_batch_size) == (77, 24, 8)
    assert contract.parameter(text, contract.PARAM_CLASSIFIER) == "shop"
    assert contract.parameter(text, contract.PARAM_VOCAB_SHA256) == get_tokenizer().vocab_sha256
    assert contract.parameter(text, contract.PARAM_PRECISION) == "fp32"
    assert text["name"] == "shop_text" and text["version_policy"]["latest"]["num_versions"] == 2
    assert "dynamic_batching" in text and [i["name"] for i in text["input"]] == ["tokens", "adapter"]
    plain = _json(bank_config("shop", _settings(open_vocabulary=False, tokenizer=None)))
    assert contract.parameter(plain, contract.PARAM_TEXT_MODEL) is None
    with pytest.raises(ValueError, match="no open vocabulary"):
        bank_text_config("shop", _settings(open_vocabulary=False, tokenizer=None))


def test_the_text_encoder_stays_fp32_beside_int8_and_gets_tensorrt_for_both_inputs_on_gpu() -> None:
    cpu = _json(bank_text_config("shop", _settings(target="cpu-int8", precision="int8")))
    assert contract.parameter(cpu, contract.PARAM_PRECISION) == "fp32"
    assert cpu["instance_group"][0]["kind"] == "KIND_CPU"
    gpu = bank_text_config("shop", _settings(target="gpu"))
    text = str(gpu)
    assert "trt_profile_min_shapes" in text and "tokens:1x77,adapter:1x1" in text
    assert [sorted(w.inputs) for w in gpu.model_warmup] == [["adapter", "tokens"]] * 2


def test_the_reference_adds_an_adapters_text_branches_and_takes_them_out(tmp_path: Path, tiny_base) -> None:
    adapter = _adapter(tmp_path, encoder="both", position="top2", params=("q", "v"), seed=4)
    reference = bank_verify.Reference(tiny_base.model)
    base = _encode(tiny_base.model, tiny_base.tokenizer, STRINGS)
    merged = _encode(merge_adapter(tiny_base.model, adapter)[0], tiny_base.tokenizer, STRINGS)
    with reference.adapted(adapter) as adapted:
        got = _encode(adapted, tiny_base.tokenizer, STRINGS)
    assert (got - merged).abs().max() < 1e-5 and (merged - base).abs().max() > 1e-3
    assert (_encode(reference.model, tiny_base.tokenizer, STRINGS) - base).abs().max() < 1e-5  # branches out again
    assert sum(isinstance(m, LoraAttention) for m in reference.model.visual.modules()) > 0  # one copy, both towers


def _record(**overrides: object) -> BankTextVerificationRecord:
    small = EmbeddingComparisonRecord(max_logit_error=1e-5, max_abs=1e-6, min_cosine=1.0)
    values = dict(strings=14, tolerance_abs_logit=1e-3, text_vs_reference=small, text_updates=True,
                  text_vs_base=EmbeddingComparisonRecord(max_logit_error=0.5, max_abs=0.01, min_cosine=0.99),
                  mixed_batch_max_logit_error=0.0, tokenizer_matches=True, passed=True)
    return BankTextVerificationRecord(**{**values, **overrides})


@pytest.mark.parametrize("overrides,match", [
    (dict(text_vs_reference=EmbeddingComparisonRecord(max_logit_error=0.01, max_abs=1e-3, min_cosine=0.99)),
     "differ from the unmerged reference's by up to 0.01"),
    (dict(text_vs_base=EmbeddingComparisonRecord(max_logit_error=1e-4, max_abs=1e-5, min_cosine=1.0)),
     "its text updates change no text embedding"),
    (dict(text_updates=False), "without text updates its text embeddings differ from the base's"),
    (dict(mixed_batch_max_logit_error=0.02), "in a batch mixing adapters"),
    (dict(tokenizer_matches=False), "other token ids than open_clip's"),
])
def test_each_text_check_can_fail(overrides: dict, match: str) -> None:
    assert bank_text_verify.failures(_record()) == []
    assert bank_text_verify.failures(_record(text_updates=False, text_vs_base=_record().text_vs_reference)) == []
    problems = bank_text_verify.failures(_record(**overrides))
    assert len(problems) == 1 and match in problems[0]
    with pytest.raises(Exception, match="failed its text encoder verification inside the bank"):
        bank_text_verify.check_passed("adapter 'a'", _record(**overrides, passed=False))


def test_a_bank_manifest_written_before_open_vocabulary_still_reads() -> None:
    path = DATA / "bank-v2-before-open-vocabulary.json"
    manifest = BankManifest.read(path)
    assert manifest.settings.open_vocabulary is False and manifest.settings.towers == ("vision",)
    assert manifest.files.text is None and manifest.adapter("a").verification.text is None
    assert manifest.base_verification.text is None and manifest.settings.tokenizer is None
    assert manifest.to_dict() == json.loads(path.read_text())  # nothing added on the way back out
