"""An adapter bank version's files: the graph, the shared base weights, this version's factors.

A bank version folder holds::

    model.onnx            the graph and its small constants (no large weights)
    base_weights.bin      ONNX external data: every large base weight, identical in every
                          version of the bank, so each version HARD-LINKS the previous one's
                          file (same inode: no copy on disk, one page cache)
    adapter_factors.bin   ONNX external data: the factor stacks A [K, R, d_in] and B [K, d_out, R]
                          of every slot (`cliplora.model.bank_graph`), this version's only data
    manifest.json
    fp32_model.onnx, fp32_base_weights.bin   cpu-int8 banks only: the fp32 bank (same factors
                          file), what each adapter's INT8 gate compares against

A new version is made from the previous one without torch: its ``model.onnx`` is the
previous proto with each stack initializer's first dimension and external-data offsets
changed (no node changes), its factors file is written anew, and its base weights file is
a hard link to the previous one's, whose sha256 must match the one the bank recorded.
The link is made last, by `cliplora.export.publish` as the version goes in: Triton's
polling notices a file's inode change, and a new link changes the inode the *serving*
version reads, which makes Triton reload that version (a whole base-model load; measured
with the local Triton). Until then the staged graph is checked with its base weights
supplied from the previous version's file in memory (`base_initializers`).
Offsets in both files are aligned to 4 KiB, so ONNX Runtime may map them instead of
copying them. Everything here works on protos and numpy arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, numpy_helper

from cliplora.core import contract
from cliplora.core.errors import FailedPrecondition
from cliplora.core.hashing import sha256_file

ALIGNMENT = 4096
FP32_MODEL_FILENAME = "fp32_model.onnx"
FP32_BASE_WEIGHTS_FILENAME = "fp32_base_weights.bin"
INLINE_LIMIT_BYTES = 1024  # smaller base constants stay inside model.onnx
KEY_SEPARATOR = "#"  # a stack's name may carry "#<digest>" (the TensorRT engine-cache key, `--target gpu`)


@dataclass(frozen=True)
class GraphFiles:
    """A graph file and the base weights file it reads (the factors file is common to all)."""

    graph: str
    base_weights: str


BANK_FILES = GraphFiles(contract.MODEL_FILENAME, contract.BANK_BASE_WEIGHTS_FILENAME)
FP32_FILES = GraphFiles(FP32_MODEL_FILENAME, FP32_BASE_WEIGHTS_FILENAME)


@dataclass(frozen=True)
class StoredFile:
    """One file a version's graph reads its data from."""

    sha256: str
    bytes: int


def stack_of(initializer_name: str) -> str:
    """A stack initializer's name without its engine-cache key."""
    return initializer_name.split(KEY_SEPARATOR, 1)[0]


def _write_aligned(handle: object, data: bytes) -> int:
    """Append `data` at the next aligned offset; returns that offset."""
    offset = -handle.tell() % ALIGNMENT  # type: ignore[attr-defined]
    handle.write(b"\0" * offset)  # type: ignore[attr-defined]
    start = handle.tell()  # type: ignore[attr-defined]
    handle.write(data)  # type: ignore[attr-defined]
    return start


def _externalize(tensors: Iterable[TensorProto], folder: Path, filename: str) -> StoredFile:
    """Move the data of `tensors` into ``folder/filename`` and point each tensor at it."""
    path = folder / filename
    with open(path, "wb") as handle:
        for tensor in tensors:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))  # raw_data only
            start = _write_aligned(handle, tensor.raw_data)
            external_data_helper.set_external_data(tensor, filename, offset=start, length=len(tensor.raw_data))
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
    return StoredFile(sha256_file(path), path.stat().st_size)


def tensor_dtype(tensor: TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def split_weights(model: onnx.ModelProto, stacks: Mapping[str, str], folder: Path,
                  files: GraphFiles = BANK_FILES) -> tuple[StoredFile, StoredFile]:
    """The first version's files from a freshly exported (weights inline) bank graph.

    `stacks` maps each stack's name to its initializer's name in `model`; the initializers
    are renamed to the stack names and set to one all-zero slot (the base). Writes the
    graph, its base weights file and the factors file into `folder`."""
    renamed = {old: new for new, old in stacks.items()}
    for node in model.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    stack_tensors, base_tensors = [], []
    for tensor in model.graph.initializer:
        if tensor.name in renamed:
            if tensor.data_type != TensorProto.FLOAT:
                raise FailedPrecondition(f"factor stack {renamed[tensor.name]} is not fp32 in the graph")
            tensor.name = renamed[tensor.name]
            tensor.CopyFrom(numpy_helper.from_array(np.zeros(tuple(tensor.dims), dtype=np.float32), tensor.name))
            stack_tensors.append(tensor)
        elif _nbytes(tensor) > INLINE_LIMIT_BYTES:
            base_tensors.append(tensor)
    if len(stack_tensors) != len(stacks):
        raise FailedPrecondition(f"the bank graph holds {len(stack_tensors)} of its {len(stacks)} factor stacks")
    base = _externalize(base_tensors, folder, files.base_weights)
    factors = _externalize(sorted(stack_tensors, key=lambda t: t.name), folder, contract.BANK_FACTORS_FILENAME)
    onnx.save(model, str(folder / files.graph))
    return base, factors


def _nbytes(tensor: TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) * tensor_dtype(tensor).itemsize


def load_graph(folder: Path, files: GraphFiles = BANK_FILES) -> onnx.ModelProto:
    """A version's graph without its external data."""
    return onnx.load(str(folder / files.graph), load_external_data=False)


def stack_initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """The stack initializers of a bank graph, by stack name."""
    return {stack_of(t.name): t for t in model.graph.initializer
            if t.data_location == TensorProto.EXTERNAL and _location(t) == contract.BANK_FACTORS_FILENAME}


def _location(tensor: TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def read_stacks(folder: Path) -> dict[str, np.ndarray]:
    """Every factor stack of a version, by stack name (read from its factors file)."""
    path = folder / contract.BANK_FACTORS_FILENAME
    stacks = {}
    for name, tensor in stack_initializers(load_graph(folder)).items():
        info = external_data_helper.ExternalDataInfo(tensor)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        values = np.fromfile(path, dtype="<f4", count=count, offset=info.offset)
        if values.size != count or info.length not in (None, 0, count * 4):
            raise FailedPrecondition(f"{path} is shorter than its graph says (stack {name}): the version is damaged")
        stacks[name] = values.reshape(tuple(tensor.dims)).astype(np.float32)
    return stacks


def write_version(previous: Path, staged: Path, stacks: Mapping[str, np.ndarray],
                  graphs: Sequence[GraphFiles] = (BANK_FILES,)) -> StoredFile:
    """A new version in `staged` from the previous version, without its base weights (the
    publish links them in): each of `graphs` with each stack initializer's shape and offsets
    changed, the factors file written once for all (an engine-cache key the previous graph
    carried stays until `stamp_graph` replaces it). Returns the factors file."""
    models = {files: load_graph(previous, files) for files in graphs}
    first = stack_initializers(models[BANK_FILES])
    _check_stacks(first, stacks, previous)
    for name, tensor in first.items():
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(stacks[name], dtype=np.float32), tensor.name))
    ordered = sorted(first.values(), key=lambda t: stack_of(t.name))
    factors = _externalize(ordered, staged, contract.BANK_FACTORS_FILENAME)
    for files, model in models.items():
        tensors = stack_initializers(model)
        _check_stacks(tensors, stacks, previous)
        if files is not BANK_FILES:  # the same offsets in the same factors file
            for name, tensor in tensors.items():
                tensor.CopyFrom(first[name])
        onnx.save(model, str(staged / files.graph))
    return factors


def _check_stacks(initializers: Mapping[str, TensorProto], stacks: Mapping[str, np.ndarray], previous: Path) -> None:
    if set(initializers) != set(stacks):
        raise FailedPrecondition(f"the bank graph in {previous} holds {len(initializers)} factor stacks, not the "
                                 f"{len(stacks)} given: the version is damaged")
    for name, tensor in initializers.items():
        expected = tuple(tensor.dims[1:])
        if tuple(stacks[name].shape[1:]) != expected:
            raise ValueError(f"stack {name} must be [K, {', '.join(map(str, expected))}], got {stacks[name].shape}")


def _stamp_key(model: onnx.ModelProto, tensor: TensorProto, key: str) -> None:
    """Rename `tensor` to carry `key`: ONNX Runtime's TensorRT engine cache is keyed by tensor
    names (`cliplora.export.engine_key`), and only the stacks differ between versions."""
    old, new = tensor.name, f"{stack_of(tensor.name)}{KEY_SEPARATOR}{key}"
    tensor.name = new
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


def check_base_files(previous: Path, base_sha256: Mapping[str, str]) -> dict[str, StoredFile]:
    """The previous version's base weights files (`base_sha256`: file name -> the content the
    bank recorded), checked before the new version links them: a damaged file is not passed
    on to every later version."""
    checked = {}
    for filename, sha256 in base_sha256.items():
        source = previous / filename
        if not source.is_file():
            raise FailedPrecondition(f"{source} is missing: the bank's latest version is damaged; nothing published")
        found = sha256_file(source)
        if found != sha256:
            raise FailedPrecondition(f"{source} changed since the bank was created (sha256 {found[:12]}..., recorded "
                                     f"{sha256[:12]}...); nothing published: re-create the bank")
        checked[filename] = StoredFile(sha256, source.stat().st_size)
    return checked


def base_initializers(folder: Path, files: GraphFiles, base_folder: Path) -> dict[str, np.ndarray]:
    """The base weights a version's graph reads from its base weights file, taken from the
    file in `base_folder` (mapped, not read): what a session needs to check a staged graph
    before its base weights are linked in."""
    path = base_folder / files.base_weights
    found = {}
    for tensor in load_graph(folder, files).graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL and _location(tensor) == files.base_weights:
            offset = external_data_helper.ExternalDataInfo(tensor).offset
            found[tensor.name] = np.memmap(path, dtype=tensor_dtype(tensor).newbyteorder("<"), mode="r",
                                           offset=offset, shape=tuple(tensor.dims))
    return found


def stamp_graph(folder: Path, key: str, files: GraphFiles = BANK_FILES) -> None:
    """Give a version's first stack the engine-cache `key` (version 1; later ones: `write_version`)."""
    model = load_graph(folder, files)
    stacks = stack_initializers(model)
    _stamp_key(model, stacks[min(stacks)], key)
    onnx.save(model, str(folder / files.graph))
