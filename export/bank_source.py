"""The base model of a bank: recorded by `bank create`, loaded again by every `bank add`.

`bank add` is not told ``--model``/``--pretrained`` again: it loads what the bank's
manifest recorded (a path made absolute, so the command may run from anywhere) and refuses
when the weights, or a JSON model config, are no longer the content the bank was made
from: an adapter verified against other weights than the ones served would be a lie.
"""

from __future__ import annotations

from pathlib import Path

from cliplora.core.bank_manifest import BankBaseRecord
from cliplora.core.errors import FailedPrecondition
from cliplora.core.hashing import sha256_file
from cliplora.model.base_model import BaseModel, load_base_model


def _absolute(spec: str | None) -> str | None:
    if spec is None or spec in ("", "none"):
        return None
    path = Path(spec)
    return str(path.resolve()) if path.exists() else spec


def load_source(model: str, pretrained: str | None, allow_random_weights: bool) -> tuple[BaseModel, BankBaseRecord]:
    """The base model for `bank create`, and the record `bank add` loads it again from."""
    model_spec, pretrained_spec = _absolute(model) or model, _absolute(pretrained)
    base = load_base_model(model_spec, pretrained_spec, allow_random_weights=allow_random_weights)
    config_sha = sha256_file(model_spec) if Path(model_spec).is_file() else None
    record = BankBaseRecord(model=model_spec, model_config_sha256=config_sha, pretrained=pretrained_spec,
                            allow_random_weights=allow_random_weights, base=base.record())
    return base, record


def reload_source(source: BankBaseRecord, bank: str) -> BaseModel:
    """The bank's base model again; FailedPrecondition when its files changed since `bank create`."""
    if source.model_config_sha256 is not None:
        path = Path(source.model)
        found = sha256_file(path) if path.is_file() else "missing"
        if found != source.model_config_sha256:
            raise FailedPrecondition(f"the model config {path} of bank {bank!r} changed since `bank create` "
                                     f"(sha256 {found[:12]}, recorded {source.model_config_sha256[:12]}); "
                                     "nothing published: restore it or create a new bank")
    base = load_base_model(source.model, source.pretrained, allow_random_weights=source.allow_random_weights)
    recorded = source.base.weights
    if (base.weights.kind, base.weights.sha256) != (recorded.kind, recorded.sha256):
        raise FailedPrecondition(
            f"the base weights of bank {bank!r} ({recorded.source}) are not the ones `bank create` loaded "
            f"(sha256 {str(base.weights.sha256)[:12]}, recorded {str(recorded.sha256)[:12]}); nothing published: "
            "restore them or create a new bank")
    if base.record() != source.base:
        raise FailedPrecondition(f"the base model of bank {bank!r} loads differently than at `bank create` "
                                 "(another open_clip version?); nothing published")
    return base
