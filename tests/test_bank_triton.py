"""Adapter banks through the real local Triton, without the gateway (one tritonserver for the
module): the adapter table and class embeddings as Triton serves them (strings included, our
Python ONNX Runtime backend), and a version that fails to load. Through the gateway, with
mixed batches and adapters added under load: tests/test_bank_serving.py."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from cliplora.core import contract
from cliplora.export import bank_verify
from cliplora.export.bank_create import create_bank
from cliplora.export.bank_options import AdapterSpec, BankOptions
from cliplora.export.bank_update import add_adapters
from cliplora.serve.stack.triton_launcher import LocalTriton
from tests import banks, factories
from tests.serving import triton_ports

pytestmark = pytest.mark.triton
BANK = "tb"
TABLE = contract.adapters_model_name(BANK)
LOAD_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path):
    """Bank `tb` (base with classes, a vision+text, a text-only and a vision-only adapter) in a
    running Triton; yields (root, Triton, client, the latest result)."""
    root = tmp_path_factory.mktemp("bank-serving")
    classes = factories.write_classes(root / "classes.txt", banks.CLASSES)
    create_bank(BankOptions(name=BANK, model=str(tiny_config), pretrained=None, allow_random_weights=True,
                            repository=root / "repo", classes=classes))
    loras = {"both": dict(encoder="both", position="all"), "text": dict(encoder="text", position="all", seed=3),
             "vision": dict(encoder="vision", position="half-up", seed=4)}
    specs = [AdapterSpec(a, str(factories.write_paper_checkpoint(root / f"{a}.pt", **kw)), classes)
             for a, kw in loras.items()]
    result = add_adapters(root / "repo", BANK, specs)
    with LocalTriton(root / "repo", ports=triton_ports(), log_path=root / "triton.log", poll_seconds=1) as triton:
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        _wait_ready(client, BANK, "2")
        _wait_ready(client, TABLE, "2")
        yield root, triton, client, result


def _wait_ready(client: grpcclient.InferenceServerClient, model: str, version: str) -> None:
    started = time.monotonic()
    while not client.is_model_ready(model, version):
        assert time.monotonic() - started < LOAD_TIMEOUT_S, f"{model} version {version} not ready"
        time.sleep(0.1)


def _embeds(client: grpcclient.InferenceServerClient, crops: np.ndarray, slots: list[int],
            version: str = "") -> np.ndarray:
    image = grpcclient.InferInput(contract.INPUT_NAME, list(crops.shape), contract.INPUT_WIRE_DTYPE)
    image.set_data_from_numpy(crops)
    adapter = grpcclient.InferInput(contract.BANK_ADAPTER_NAME, [len(slots), 1], contract.BANK_ADAPTER_WIRE_DTYPE)
    adapter.set_data_from_numpy(np.asarray(slots, dtype=np.int32).reshape(-1, 1))
    return client.infer(BANK, [image, adapter], model_version=version).as_numpy(contract.BANK_OUTPUT_NAME)


def _table(client: grpcclient.InferenceServerClient, slot: int, version: str = "") -> dict[str, np.ndarray]:
    adapter = grpcclient.InferInput(contract.BANK_ADAPTER_NAME, [1], contract.BANK_ADAPTER_WIRE_DTYPE)
    adapter.set_data_from_numpy(np.array([slot], dtype=np.int32))
    names = [contract.CLASS_EMBEDS_NAME, contract.CLASS_COUNT_NAME, contract.CLASS_NAMES_NAME,
             contract.ADAPTER_TABLE_NAME]
    result = client.infer(TABLE, [adapter], model_version=version,
                          outputs=[grpcclient.InferRequestedOutput(n) for n in names])
    return {n: result.as_numpy(n) for n in names}


def test_triton_serves_the_adapter_table_and_each_adapters_classes(served) -> None:
    root, _, client, result = served
    config = client.get_model_config(TABLE, as_json=True)["config"]
    assert contract.adapters_model_shape(TABLE, config) == result.manifest.settings.embedding_dim
    shape = contract.bank_shape(BANK, client.get_model_config(BANK, as_json=True)["config"])
    assert (shape.adapters_model, shape.max_rank, shape.matrices) == (TABLE, 2, ("q", "k", "v"))
    companion = banks.session(root / "repo" / TABLE / "2")
    tables = set()
    for record in result.manifest.adapters:
        served_entry, local = _table(client, record.slot), banks.table_entry(companion, record.slot)
        count = int(served_entry[contract.CLASS_COUNT_NAME][0])
        assert count == len(record.classes) == len(banks.CLASSES)
        assert [n.decode() for n in served_entry[contract.CLASS_NAMES_NAME][:count]] == banks.CLASSES
        assert np.abs(served_entry[contract.CLASS_EMBEDS_NAME] - local[contract.CLASS_EMBEDS_NAME]).max() < 1e-6
        tables.add(bytes(served_entry[contract.ADAPTER_TABLE_NAME][0]))
    (raw,) = tables  # the same table for every slot
    rows = contract.read_adapter_table(raw)
    assert [json.loads(json.dumps(r.__dict__, default=list)) for r in rows] == \
        [json.loads(json.dumps(a.row())) for a in result.manifest.adapters]
    embeds = [_table(client, a.slot)[contract.CLASS_EMBEDS_NAME] for a in result.manifest.adapters]
    assert np.abs(embeds[0] - embeds[1]).max() > 1e-3  # the adapters' class embeddings are their own


def test_an_add_loads_the_new_version_and_reloads_nothing_else(served, monkeypatch) -> None:
    root, triton, client, result = served
    loads = re.compile(rf'"loading: {BANK}:(\d+)"')
    before = loads.findall(triton.log_path.read_text(errors="replace"))
    lora = factories.write_paper_checkpoint(root / "late.pt", encoder="vision", position="all", seed=9)
    check = bank_verify.check_adapter
    states: list[tuple[str, str]] = []
    during: list[str] = []

    def as_slow_as_a_real_model(*args: object, **kwargs: object):
        # A ViT-B/16's verification takes seconds, and Triton polls (every second) meanwhile:
        # what serves must stay READY all along, and no model may start loading.
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            index = {(m["name"], m.get("version")): m.get("state") for m in
                     client.get_model_repository_index(as_json=True)["models"]}
            states.append((index.get((BANK, "2"), "gone"), index.get((TABLE, "2"), "gone")))
            time.sleep(0.05)
        during.extend(re.findall(r'"loading: [^"]+"', triton.log_path.read_text(errors="replace")[start:]))
        return check(*args, **kwargs)

    monkeypatch.setattr(bank_verify, "check_adapter", as_slow_as_a_real_model)
    start = len(triton.log_path.read_text(errors="replace"))  # from the add's start to its verification's end
    added = add_adapters(root / "repo", BANK, [AdapterSpec("late", str(lora), root / "classes.txt")])
    _wait_ready(client, BANK, str(added.version))
    time.sleep(3)  # polls after the new version: none may reload the bank again
    after = loads.findall(triton.log_path.read_text(errors="replace"))
    assert len(states) > 20 and set(states) == {("READY", "READY")}, sorted(set(states))
    assert not during, during  # nothing reloaded while the version was being made
    assert before == ["2"] and after == ["2", str(added.version)], after  # the base model loaded once per version
    slot = added.manifest.adapter("late").slot
    crops = banks.images(1)
    assert np.abs(_embeds(client, crops, [slot]) - banks.bank_embeds(banks.session(added.path), crops, [slot])).max() \
        < 1e-5


def test_a_version_that_fails_to_load_leaves_the_previous_one_serving(served) -> None:
    root, triton, client, _ = served
    repo = root / "repo"
    latest = max(int(p.name) for p in (repo / BANK).iterdir() if p.name.isdigit())
    broken = latest + 1
    crops = banks.images(2, seed=4)
    before = _embeds(client, crops, [0, 1])
    for model in (BANK, TABLE):  # a complete-looking version whose factors file is cut short
        staging = repo / model / ".planted"
        shutil.copytree(repo / model / str(latest), staging)
        (staging / contract.MANIFEST_FILENAME).unlink()
        if model == BANK:
            factors = staging / contract.BANK_FACTORS_FILENAME
            factors.write_bytes(factors.read_bytes()[:100])
        staging.rename(repo / model / str(broken))
    _wait_ready(client, TABLE, str(broken))
    started = time.monotonic()
    while True:
        states = {(m["name"], m.get("version")): m for m in client.get_model_repository_index(as_json=True)["models"]}
        state = states.get((BANK, str(broken)), {})
        if state.get("state") == "UNAVAILABLE" and state.get("reason"):
            break
        assert time.monotonic() - started < LOAD_TIMEOUT_S, f"no load failure reported: {state}"
        time.sleep(0.2)
    assert "out of bounds" in state["reason"] or "ONNXRuntimeError" in state["reason"], state
    assert "failed to load 'tb' version" in triton.log_path.read_text(errors="replace")  # loud in the log too
    assert client.is_model_ready(BANK, str(latest)) and client.is_model_ready(TABLE, str(latest))
    assert np.abs(_embeds(client, crops, [0, 1]) - before).max() < 1e-6  # the latest good version answers
    assert np.abs(_embeds(client, crops, [0, 1], str(latest)) - before).max() < 1e-6
