"""Publishing a model version into a Triton model repository, atomically.

The slow work (ONNX export, verification) happens in a private temporary folder
outside the repository: Triton treats *every* folder in a repository's root as a
model, so nothing half-made may appear there. Publishing then, under an exclusive
per-model lock (``<repository>/.cliplora-<name>.lock``, a file, which Triton ignores):

- the version's files are moved into ``<repository>/<name>/.incoming-*`` (Triton
  ignores non-numeric folders inside a model) and renamed to the next version number:
  Triton never sees a half-written version;
- a new model's folder gets ``labels.txt``, its first version, and ``config.pbtxt``
  last, so a model with a config is always complete.

A failed export or publish leaves the repository as it was; concurrent exports to one
name take versions 1, 2, ... in turn. An existing model accepts a new version only if
its ``config.pbtxt`` and ``labels.txt`` stay byte-identical (same classes, input size
and precision): both belong to the model, not to a version, in Triton's layout.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cliplora import contract
from cliplora.atomic import write_text_atomically
from cliplora.errors import FailedPrecondition, PermissionDenied
from cliplora.repository import ModelRepository, validate_model_name
from export.hashing import sha256_file

TARGETS = ("portable", "gpu")
TRT_CACHE_ROOT = "/cache/tensorrt"  # the deployment mounts a writable volume here (deploy/)
TRT_WORKSPACE_BYTES = 2 * 1024**3
TRT_OPT_BATCH = 8  # the TensorRT profile's tuning point: a typical dynamic batch under load


def render_config(
    name: str, spec: contract.TensorSpec, precision: str, max_batch_size: int, target: str = "portable"
) -> str:
    """The model's ``config.pbtxt``.

    One instance and no instance kind (KIND_AUTO): one instance per GPU where there are
    GPUs, one on the CPU otherwise, so one repository serves both. One CPU instance
    using every core, fed batches by the dynamic batcher, beat two single-threaded
    instances here (two instances let the batcher hand a batch of two to one instance
    while the other idles: docs/benchmarks.md). fp16 models ask Triton's ONNX Runtime
    backend for its TensorRT accelerator in FP16 on GPUs (ignored on CPUs).

    ``target="gpu"`` adds what a production GPU server wants (:func:`_gpu_blocks`); the
    instance kind stays portable, so the same file still loads on a CPU-only Triton.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    dims = ", ".join(str(d) for d in spec.input_shape)
    lines = [
        f'name: "{name}"',
        f'platform: "{contract.PLATFORM}"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f'    name: "{contract.INPUT_NAME}"',
        f"    data_type: {contract.INPUT_TRITON_DTYPE}",
        f"    dims: [ {dims} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{contract.OUTPUT_NAME}"',
        f"    data_type: {contract.OUTPUT_TRITON_DTYPE}",
        f"    dims: [ {spec.num_classes} ]",
        f'    label_filename: "{contract.LABELS_FILENAME}"',
        "  }",
        "]",
        "instance_group [",
        "  {",
        "    count: 1",
        "  }",
        "]",
        "dynamic_batching {",
        "  max_queue_delay_microseconds: 2000",
        "}",
        "parameters {",
        '  key: "precision"',
        f'  value: {{ string_value: "{precision}" }}',
        "}",
    ]
    if target == "gpu":
        lines += _gpu_blocks(name, spec, max_batch_size)
    elif precision == "fp16":
        lines += _tensorrt_fp16({})
    return "\n".join(lines) + "\n"


def _tensorrt_fp16(extra: dict[str, str]) -> list[str]:
    """Triton's ONNX Runtime backend: the TensorRT execution accelerator in FP16.

    Parameter names are the backend's (``precision_mode``, ``max_workspace_size_bytes``,
    then ONNX Runtime's ``trt_*`` provider options, which the backend passes on). The
    backend refuses unknown names, so nothing else goes here. CPU instances ignore it.
    """
    params = {"precision_mode": "FP16", "max_workspace_size_bytes": str(TRT_WORKSPACE_BYTES), **extra}
    return [
        "optimization {",
        "  execution_accelerators {",
        "    gpu_execution_accelerator: [",
        "      {",
        '        name: "tensorrt"',
        *(f'        parameters {{ key: "{key}" value: "{value}" }}' for key, value in params.items()),
        "      }",
        "    ]",
        "  }",
        "}",
    ]


def _gpu_blocks(name: str, spec: contract.TensorSpec, max_batch_size: int) -> list[str]:
    """TensorRT FP16 with an engine cache and one optimisation profile, and warm-up.

    - **One profile for every batch size** (``trt_profile_*``, 1 .. max_batch_size, tuned
      for ``TRT_OPT_BATCH``): without it ONNX Runtime builds an engine for the first batch
      size it sees and rebuilds (seconds to minutes, requests waiting) each time a larger
      batch arrives. ONNX Runtime needs the three options together when the cache is on.
    - **Engine cache** in ``<TRT_CACHE_ROOT>/<name>`` (ONNX Runtime creates that last
      folder; the deployment mounts TRT_CACHE_ROOT): a restart loads the engine instead of
      rebuilding it. The cache key does not cover weights, hence one folder per model and
      :func:`stamp_engine_key` for versions. The timing cache (kernel timings only, safe to
      share) lives in TRT_CACHE_ROOT itself and speeds up builds of every model.
    - **Warm-up** with zero images at batch 1 and at max_batch_size: the engine is built
      or loaded, and the largest buffers allocated, before Triton reports the model ready,
      so the first real request does not pay for it.
    """
    dims = "x".join(str(d) for d in spec.input_shape)
    profile = {
        "trt_profile_min_shapes": f"{contract.INPUT_NAME}:1x{dims}",
        "trt_profile_opt_shapes": f"{contract.INPUT_NAME}:{min(TRT_OPT_BATCH, max_batch_size)}x{dims}",
        "trt_profile_max_shapes": f"{contract.INPUT_NAME}:{max_batch_size}x{dims}",
    }
    cache = {
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": f"{TRT_CACHE_ROOT}/{name}",
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": TRT_CACHE_ROOT,
    }
    lines = _tensorrt_fp16({**cache, **profile})
    shape = ", ".join(str(d) for d in spec.input_shape)
    warmups = []
    for batch in sorted({1, max_batch_size}):
        warmups += [
            "  {",
            f'    name: "zeros-batch-{batch}"',
            f"    batch_size: {batch}",
            "    inputs {",
            f'      key: "{contract.INPUT_NAME}"',
            "      value: {",
            f"        data_type: {contract.INPUT_TRITON_DTYPE}",
            f"        dims: [ {shape} ]",
            "        zero_data: true",
            "      }",
            "    }",
            "  },",
        ]
    warmups[-1] = "  }"
    return lines + ["model_warmup [", *warmups, "]"]


def stamp_engine_key(onnx_path: Path) -> str:
    """Make the TensorRT engine-cache key of this ONNX file depend on its weights.

    ONNX Runtime names cached engines after a hash of the file *name* (always
    ``model.onnx``) and of the graph's tensor names, not of the weights: two versions of
    one model, or two adapters on one base, hash alike, and with a shared cache folder
    the second would silently run the first one's engine, weights included. Renaming
    the class-head initializer (the constant operand of the final MatMul, which no
    optimisation folds away) to carry a digest of the exported file changes the key
    whenever any weight changes. Returns the new name. Run before verification, so what
    is verified is what is published.
    """
    import onnx

    digest = sha256_file(onnx_path)[:16]
    model = onnx.load(str(onnx_path))
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    final = [node for node in graph.node if contract.OUTPUT_NAME in node.output]
    constants = [name for node in final for name in node.input if name in initializers]
    if not constants:
        raise FailedPrecondition(f"{onnx_path}: the node producing {contract.OUTPUT_NAME!r} has no constant "
                                 "input to carry the engine-cache key")
    old = constants[0]
    new = f"{old}_{digest}"
    initializers[old].name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for value in graph.input:  # older IR versions list initializers as inputs too
        if value.name == old:
            value.name = new
    onnx.save(model, str(onnx_path))
    return new


def render_labels(classes: list[str]) -> str:
    return "".join(f"{c}\n" for c in classes)


def _writable_root(root: Path) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise PermissionDenied(f"cannot create model repository {root}") from None
    except (FileExistsError, NotADirectoryError):
        raise PermissionDenied(f"model repository {root} is not a folder") from None
    if not root.is_dir():
        raise PermissionDenied(f"model repository {root} is not a folder")
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionDenied(f"cannot write to model repository {root}")
    return root


def check_compatible(root: Path, name: str, config: str | None, labels: str) -> None:
    """Stop early if `name` exists with other classes or another config."""
    folder = root / validate_model_name(name)
    if not folder.exists():
        return
    for filename, wanted in ((contract.LABELS_FILENAME, labels), (contract.CONFIG_FILENAME, config)):
        path = folder / filename
        if wanted is None or not path.exists():
            continue
        if path.read_text(encoding="utf-8") != wanted:
            what = "classes" if filename == contract.LABELS_FILENAME else "configuration (input size, precision)"
            raise FailedPrecondition(
                f"model {name!r} already exists in {root} with different {what}; "
                f"a new version must keep them. Export under a new --name."
            )


def preflight(root: Path, name: str, labels: str) -> None:
    """Checks that need no model: a valid name, a writable repository, the same classes."""
    validate_model_name(name)
    _writable_root(root)
    check_compatible(root, name, None, labels)


@contextmanager
def model_lock(root: Path, name: str) -> Iterator[None]:
    lock_path = _writable_root(root) / f".cliplora-{validate_model_name(name)}.lock"
    try:
        handle = open(lock_path, "a")
    except OSError as exc:
        raise PermissionDenied(f"cannot write to model repository {root}: {exc}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def staging_area() -> Iterator[Path]:
    """A private temporary folder, removed afterwards whatever happens."""
    path = Path(tempfile.mkdtemp(prefix="cliplora-export-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish_version(root: Path, name: str, staged_version: Path, *, config: str, labels: str) -> int:
    """Move a staged version folder (model.onnx, manifest.json) into the repository.

    Returns the version number, which is also stamped into the manifest, under the lock.
    """
    with model_lock(root, name):
        check_compatible(root, name, config, labels)
        version = (ModelRepository(root).versions(name) or [0])[-1] + 1
        _stamp_version(staged_version, version)
        folder = root / name
        created = not folder.exists()
        incoming = folder / f".incoming-{uuid.uuid4().hex}"
        try:
            folder.mkdir(exist_ok=True)
            shutil.move(str(staged_version), str(incoming))  # a copy when on another filesystem
            if created:
                write_text_atomically(folder / contract.LABELS_FILENAME, labels)
            os.rename(incoming, folder / str(version))
            if created:
                write_text_atomically(folder / contract.CONFIG_FILENAME, config)
        except BaseException as exc:
            shutil.rmtree(folder if created else incoming, ignore_errors=True)
            if isinstance(exc, OSError):
                raise FailedPrecondition(f"could not publish {name} into {root}, nothing published: {exc}") from exc
            raise
    return version


def _stamp_version(staged_version: Path, version: int) -> None:
    path = staged_version / contract.MANIFEST_FILENAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["version"] = version
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
