"""ONNX Runtime sessions for exported models, the same way everywhere.

fp16 graphs are created with ``ORT_ENABLE_EXTENDED`` optimisations: on the CPU
provider (onnxruntime 1.32) the layout optimisations of ``ORT_ENABLE_ALL`` crash the
process while creating a session for a half-precision ViT. fp32 graphs get
``ORT_ENABLE_ALL``, as Triton's native ONNX Runtime backend does. Idle threads do not
spin-wait: spinning threads slow every other process on a small machine (a gateway, a
Triton beside a load generator) for a gain within noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cliplora.core import contract
from cliplora.core.errors import FailedPrecondition
from cliplora.core.repository import ModelRepository, ModelVersion


def create_session(
    path: str | Path,
    *,
    precision: str = "fp32",
    threads: int = 0,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if precision == "fp16"
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=list(providers))


def run_logits(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """[N, S, S, 3] uint8 -> [N, C] fp32 logits."""
    return session.run([contract.OUTPUT_NAME], {contract.INPUT_NAME: images})[0]


@dataclass(frozen=True)
class PublishedModel:
    """A published model version opened for inference in this process."""

    repository: ModelRepository
    found: ModelVersion
    session: ort.InferenceSession

    @property
    def image_size(self) -> int:
        return int(self.session.get_inputs()[0].shape[1])

    def labels(self) -> list[str]:
        """The model's labels, checked against the graph's number of classes."""
        labels = self.repository.labels(self.found.name)
        classes = self.session.get_outputs()[0].shape[1]
        if classes != len(labels):
            raise FailedPrecondition(f"{self.found.model_path} has {classes} outputs but labels.txt has {len(labels)} lines")
        return labels


def open_published(
    repository: str | Path, name: str, version: int | None = None, *, threads: int = 0
) -> PublishedModel:
    """The given (or latest) version of a published model, as an ONNX Runtime session."""
    repo = ModelRepository(repository)
    found = repo.get(name, version)
    return PublishedModel(repo, found, create_session(found.model_path, precision=found.precision, threads=threads))
