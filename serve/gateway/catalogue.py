"""The model catalogue: what ListModels answers, and the model-info metric.

A bank's entry lists its adapters from the newest adapter table (rank, matrices, content
hash, the version that added each).

Models, versions, sizes and classes come from Triton (discovery,
`cliplora.serve.gateway.triton`); provenance (base model, weights, LoRA, precision) from
each model's manifest when the gateway can read the repository (``--repository``),
read again only when the file changes. Provenance is optional: a missing or unreadable
manifest never fails a call.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cliplora.core import contract
from cliplora.core.bank_manifest import BankManifest
from cliplora.core.manifest import Manifest, weights_id
from cliplora.core.repository import ModelRepository
from cliplora.serve.gateway.metrics import GatewayMetrics
from cliplora.serve.gateway.models import ModelEntry
from cliplora.v1 import classifier_pb2 as pb

log = logging.getLogger(__name__)


class Catalogue:
    def __init__(self, repository: Path | None, metrics: GatewayMetrics) -> None:
        self._repository = ModelRepository(repository) if repository is not None else None
        self.metrics = metrics
        # (name, version) -> (manifest file's mtime, manifest): read again only when the file changes
        self._manifests: dict[tuple[str, int], tuple[int, Manifest | BankManifest]] = {}

    def list_models(self, models: dict[str, ModelEntry]) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self.model_info(entry) for entry in models.values()])

    def model_info(self, entry: ModelEntry) -> pb.ModelInfo:
        vocabulary = entry.open_vocabulary
        info = pb.ModelInfo(name=entry.name, versions=list(entry.versions), num_classes=entry.num_classes,
                            image_size=entry.image_size, open_vocabulary=vocabulary is not None,
                            embedding_dim=vocabulary.embedding_dim if vocabulary else 0, kind=entry.kind)
        if entry.bank is not None:
            info.embedding_dim = entry.bank.embedding_dim
            info.open_vocabulary = entry.bank.text is not None  # its NAME_text ready: labels and Embed texts work
            promotions = entry.bank.promotions
            info.adapters.extend(_adapter_info(row, promotions[row.adapter].name if row.adapter in promotions else "")
                                 for row in entry.bank.latest_table().values())
            return info  # a bank's provenance is its adapter table
        manifest = self.manifest_of(entry)
        if isinstance(manifest, Manifest):
            info.base_model = manifest.base.model
            info.weights = manifest.base.weights.source
            info.lora_format = manifest.lora.format
            info.lora_json = json.dumps(manifest.lora.model_dump(mode="json", exclude_unset=True), sort_keys=True)
            info.precision = manifest.precision
        return info

    def manifest_of(self, entry: ModelEntry) -> Manifest | BankManifest | None:
        """The latest version's manifest (a bank's own kind for a bank), when the gateway can
        read the repository."""
        if self._repository is None:
            return None
        key = (entry.name, entry.versions[-1])
        try:
            found = self._repository.get(*key)
            changed = found.manifest_path.stat().st_mtime_ns
            cached = self._manifests.get(key)
            if cached is None or cached[0] != changed:
                manifest = BankManifest.read(found.manifest_path) if entry.bank is not None else found.manifest()
                self._manifests[key] = cached = (changed, manifest)
            return cached[1]
        except Exception as exc:  # provenance is optional: never fail a call for it
            log.debug("no manifest for %s: %s", entry.name, exc)
            return None

    def publish_model_info(self, models: dict[str, ModelEntry]) -> None:
        """``cliplora_gateway_model_info``: what pairs a LoRA model with its base in the alert
        rules; called after every discovery round."""
        self.metrics.model_info.clear()
        for entry in models.values():
            manifest = self.manifest_of(entry)
            if manifest is None:
                self.metrics.model_info.labels(entry.name, "", "", "unknown").set(1)
            elif isinstance(manifest, BankManifest):  # "bank" in place of a LoRA format: its adapters vary
                base = manifest.source.base
                self.metrics.model_info.labels(entry.name, base.model, weights_id(base.weights), contract.KIND_BANK).set(1)
            else:
                self.metrics.model_info.labels(entry.name, manifest.base.model, manifest.base_weights_id,
                                               manifest.lora.format).set(1)


def _adapter_info(row: contract.AdapterRow, promoted_to: str) -> pb.AdapterInfo:
    return pb.AdapterInfo(id=row.adapter, num_classes=row.num_classes, rank=row.rank, lora_sha256=row.lora_sha256,
                          matrices=list(row.matrices), version_added=row.version_added, promoted_to=promoted_to)
