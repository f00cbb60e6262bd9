"""The bank's companion model `NAME_adapters`: one version's adapter table and class embeddings.

What the gateway needs to answer for an adapter lives in Triton, not in files (in
production the gateway sees no repository): for one ``adapter`` slot INT32 [1], the
companion answers that adapter's unit class embeddings ``class_embeds`` [C, D], its
``class_count`` [1] and ``class_names`` [C] (C is the version's largest class count; rows
past the adapter's count are zeros and empty strings), and the version's whole adapter
table as JSON in ``adapters`` [1] (`cliplora.core.contract.read_adapter_table`), the same
for any slot.

A small ONNX graph written with `onnx.helper` (no torch): every slot's classes are rows of
one matrix, a slot's rows are ``[offsets[slot], offsets[slot + 1])``, sliced and padded to
C. A negative slot is sent past the offsets, so ONNX Runtime refuses it instead of
wrapping around; so is a slot the version does not have.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cliplora.core import contract
from cliplora.model.graph import OPSET

OUT_OF_RANGE = 2**62  # where a negative slot goes: past any offset table
IR_VERSION = 8  # what the torch exporter writes at opset 17: readable by older ONNX Runtimes (Triton's)


@dataclass(frozen=True)
class SlotClasses:
    """One slot's classes: names and unit embeddings [C, D] (empty for a retired slot)."""

    names: Sequence[str]
    embeddings: np.ndarray


def _constant(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(values, name)


def build(slots: Sequence[SlotClasses], table: Sequence[dict[str, object]], embedding_dim: int) -> onnx.ModelProto:
    """The companion's graph for one version: `slots` in slot order, `table` its adapter table."""
    counts = np.array([len(s.names) for s in slots], dtype=np.int64)
    width = int(counts.max(initial=0))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    matrix = np.concatenate([np.zeros((0, embedding_dim), np.float32),
                             *(np.asarray(s.embeddings, np.float32).reshape(-1, embedding_dim) for s in slots)])
    names = np.array([n.encode() for s in slots for n in s.names], dtype=object)
    initializers = [
        _constant("all_embeds", matrix),
        _constant("all_names", names if len(names) else np.array([], dtype=object)),
        _constant("offsets", offsets),
        _constant("counts", counts.astype(contract.CLASS_COUNT_NUMPY_DTYPE)),
        _constant("pad_embeds", np.zeros((width, embedding_dim), np.float32)),
        _constant("pad_names", np.array([b""] * width, dtype=object)),
        _constant("width", np.array([width], np.int64)),
        _constant("zero", np.array([0], np.int64)),
        _constant("one", np.array([1], np.int64)),
        _constant("past_end", np.array([OUT_OF_RANGE], np.int64)),
        _constant("table", np.array([json.dumps(list(table)).encode()], dtype=object)),
    ]
    nodes = [
        helper.make_node("Cast", [contract.BANK_ADAPTER_NAME], ["slot64"], to=TensorProto.INT64),
        helper.make_node("Less", ["slot64", "zero"], ["negative"]),
        helper.make_node("Where", ["negative", "past_end", "slot64"], ["slot"]),
        helper.make_node("Gather", ["offsets", "slot"], ["start"]),
        helper.make_node("Add", ["slot", "one"], ["next"]),
        helper.make_node("Gather", ["offsets", "next"], ["end"]),
        helper.make_node("Gather", ["counts", "slot"], [contract.CLASS_COUNT_NAME]),
        helper.make_node("Slice", ["all_embeds", "start", "end", "zero"], ["own_embeds"]),
        helper.make_node("Concat", ["own_embeds", "pad_embeds"], ["padded_embeds"], axis=0),
        helper.make_node("Slice", ["padded_embeds", "zero", "width", "zero"], [contract.CLASS_EMBEDS_NAME]),
        helper.make_node("Slice", ["all_names", "start", "end", "zero"], ["own_names"]),
        helper.make_node("Concat", ["own_names", "pad_names"], ["padded_names"], axis=0),
        helper.make_node("Slice", ["padded_names", "zero", "width", "zero"], [contract.CLASS_NAMES_NAME]),
        helper.make_node("Identity", ["table"], [contract.ADAPTER_TABLE_NAME]),
    ]
    graph = helper.make_graph(
        nodes, "adapter_table",
        [helper.make_tensor_value_info(contract.BANK_ADAPTER_NAME, TensorProto.INT32, [1])],
        [helper.make_tensor_value_info(contract.CLASS_EMBEDS_NAME, TensorProto.FLOAT, [width, embedding_dim]),
         helper.make_tensor_value_info(contract.CLASS_COUNT_NAME, TensorProto.INT32, [1]),
         helper.make_tensor_value_info(contract.CLASS_NAMES_NAME, TensorProto.STRING, [width]),
         helper.make_tensor_value_info(contract.ADAPTER_TABLE_NAME, TensorProto.STRING, [1])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cliplora",
                             ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def write(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / contract.MODEL_FILENAME
    onnx.save(model, str(path))
    return path


def read_slots(folder: Path) -> list[SlotClasses]:
    """Every slot's classes from a published companion version (what the next version keeps)."""
    model = onnx.load(str(folder / contract.MODEL_FILENAME))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    offsets, matrix, names = values["offsets"], values["all_embeds"], values["all_names"]
    return [SlotClasses([n.decode() if isinstance(n, bytes) else str(n) for n in names[start:end]], matrix[start:end])
            for start, end in zip(offsets[:-1], offsets[1:], strict=True)]
