"""Promotion through the real local Triton (polling the repository), without the gateway:
`bank promote` brings up NAME--ID, whose config Triton serves with the promotion in it
(what the gateway reads) and whose answers are the bank's for the adapter; `bank demote`
takes it out of Triton; neither reloads the bank."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from cliplora.core import contract
from cliplora.core.bank_runtime import open_bank
from cliplora.export.bank_create import create_bank
from cliplora.export.bank_options import AdapterSpec, BankOptions
from cliplora.export.bank_promote import promote_adapter
from cliplora.export.bank_promotions import demote_adapter
from cliplora.export.bank_update import add_adapters
from cliplora.export.verify import FP32_TOLERANCE
from cliplora.serve.stack.triton_launcher import LocalTriton
from tests import banks, factories
from tests.serving import triton_ports

pytestmark = pytest.mark.triton
BANK, PROMOTED = "tp", "tp--a1"
TIMEOUT_S = 90.0


def _until(condition: Callable[[], bool], what: str) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < TIMEOUT_S, f"{what}: not within {TIMEOUT_S} s"
        time.sleep(0.1)


def _bank_loads(log: Path) -> int:
    """How many times Triton has started loading the bank (each version, each reload)."""
    return len(re.findall(rf'"loading: {BANK}:\d+"', log.read_text()))


def _index(client: grpcclient.InferenceServerClient) -> dict[str, str]:
    return {m["name"]: m.get("state", "") for m in client.get_model_repository_index(as_json=True).get("models", [])}


def test_promote_and_demote_through_triton(tmp_path: Path, tiny_config: Path) -> None:
    classes = factories.write_classes(tmp_path / "classes.txt", banks.CLASSES)
    repo = tmp_path / "repo"
    create_bank(BankOptions(name=BANK, model=str(tiny_config), pretrained=None, allow_random_weights=True,
                            repository=repo, classes=classes))
    lora = factories.write_paper_checkpoint(tmp_path / "a1.pt", encoder="both", position="all", params=("q", "v"))
    add_adapters(repo, BANK, [AdapterSpec("a1", str(lora), classes)])
    log = tmp_path / "triton.log"
    with LocalTriton(repo, ports=triton_ports(), log_path=log, poll_seconds=1) as triton:
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        _until(lambda: client.is_model_ready(BANK, "2"), "the bank ready")
        loads = _bank_loads(log)

        promote_adapter(repo, BANK, "a1")
        _until(lambda: client.is_model_ready(PROMOTED), f"{PROMOTED} ready")
        config = client.get_model_config(PROMOTED, as_json=True)["config"]
        bank = open_bank(repo, BANK)
        record = bank.adapter("a1")
        assert contract.promotion(config) == contract.Promotion(BANK, "a1", record.lora_sha256)
        crops = banks.images(4)
        image = grpcclient.InferInput(contract.INPUT_NAME, list(crops.shape), contract.INPUT_WIRE_DTYPE)
        image.set_data_from_numpy(crops)
        got = client.infer(PROMOTED, [image]).as_numpy(contract.OUTPUT_NAME)
        expected = bank.logits(bank.image_embeddings(crops, record), bank.classes(record)[0])
        assert np.abs(got - expected).max() < FP32_TOLERANCE
        base = bank.adapter(contract.BASE_ADAPTER)
        assert np.abs(got - bank.logits(bank.image_embeddings(crops, base), bank.classes(base)[0])).max() \
            > 20 * FP32_TOLERANCE  # not trivially equal

        demote_adapter(repo, BANK, "a1")
        _until(lambda: PROMOTED not in _index(client), f"{PROMOTED} gone from Triton")
        time.sleep(2.5)  # two more polls: nothing else moves
        assert client.is_model_ready(BANK, "2") and _index(client).get(PROMOTED) is None
        assert _bank_loads(log) == loads, "promote or demote made Triton reload the bank"
        assert f"successfully unloaded '{PROMOTED}'" in log.read_text()
