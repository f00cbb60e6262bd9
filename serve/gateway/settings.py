"""Gateway configuration: typed, validated, from flags and CLIPLORA_* environment variables.

Parsed in `main()` (never at import). Flags win over the environment, which wins over
the defaults below.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cliplora.core.errors import InvalidArgument
from cliplora.core.open_vocab import VocabularyLimits
from cliplora.core.preprocess import DEFAULT_DECODE, DEFAULT_MAX_PIXELS, Decoding
from cliplora.serve.gateway.decode_pool import available_cores

ENV_PREFIX = "CLIPLORA_"
DEFAULT_HTTP_PORT = 8080  # `cliplora serve --http-port`'s default (DESIGN: the local stack's HTTP door)


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    metrics_port: int = 9400  # 0: any free port; -1: no metrics endpoint
    http_port: int = 0  # the HTTP door (REST, /v1/embeddings, the playground); 0: off (the CLI's default is 8080)
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC endpoint
    triton_renew_s: float = 0.0  # reopen the Triton channel this often (re-resolves the name); 0: never
    repository: Path | None = None  # read-only, for manifests in ListModels
    max_image_bytes: int = 10 * 1024 * 1024
    max_images: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_concurrent: int = 64
    preprocess_workers: int = 0  # decoding threads; 0: one per core the gateway may use (affinity, CPU quota)
    decode: str = DEFAULT_DECODE  # exact | fast: JPEGs scaled in the decoder (README "Phone photos")
    exif_orientation: str = "apply"  # apply | ignore (open_clip's way: stored pixel order)
    default_timeout_s: float = 30.0  # when the caller sets no deadline
    refresh_interval_s: float = 5.0  # model discovery
    health_interval_s: float = 0.5  # Triton readiness probe
    grace_s: float = 10.0  # shutdown drain
    max_labels: int = 1000  # request-time labels per call (open vocabulary); also Embed's texts
    max_templates: int = 32  # request-time templates per call
    max_label_chars: int = 300  # characters per label, template or text
    max_prompts: int = 32_000  # labels x templates per call: what one call may make the text encoder embed
    text_cache_entries: int = 100_000  # prompt embeddings kept (LRU); 0: none
    adapter_series: int = 64  # banks: adapters with a request-count series, per bank (the heaviest hitters)
    tls_cert: Path | None = None  # PEM; with tls_key, the gateway speaks TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM; clients must then present a certificate it signed
    auth_tokens_file: Path | None = None  # bearer tokens, one per line (also CLIPLORA_AUTH_TOKENS)
    health_timeout_s: float = 1.0  # each Triton readiness probe: a hung Triton shows within this + the interval

    def __post_init__(self) -> None:
        positive = ("max_image_bytes", "max_images", "max_pixels", "max_concurrent",
                    "default_timeout_s", "refresh_interval_s", "health_interval_s", "max_labels", "max_templates",
                    "max_label_chars", "max_prompts", "adapter_series")
        for name in positive:
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} must be positive, got {getattr(self, name)}")
        if self.preprocess_workers < 0:
            raise InvalidArgument(f"preprocess_workers must not be negative (0: one per core), got {self.preprocess_workers}")
        self.decoding  # noqa: B018 - checks decode and exif_orientation
        if self.text_cache_entries < 0:
            raise InvalidArgument(f"text_cache_entries must not be negative, got {self.text_cache_entries}")
        if self.triton_renew_s < 0:
            raise InvalidArgument(f"triton_renew_s must not be negative, got {self.triton_renew_s}")
        if not 0 <= self.grpc_port <= 65535 or not -1 <= self.metrics_port <= 65535:
            raise InvalidArgument(f"invalid ports: grpc {self.grpc_port}, metrics {self.metrics_port}")
        if not 0 <= self.http_port <= 65535:
            raise InvalidArgument(f"http_port must be in 0..65535 (0: no HTTP door), got {self.http_port}")
        if self.grace_s < 0:
            raise InvalidArgument("grace_s must not be negative")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("TLS needs both tls_cert and tls_key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgument("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if ":" not in self.triton_url:
            raise InvalidArgument(f"triton_url must be HOST:PORT, got {self.triton_url!r}")

    @property
    def max_message_bytes(self) -> int:
        """The gRPC receive limit: every image at its limit, every label and template at
        theirs (4 bytes a character at most in UTF-8), plus room for the envelope."""
        text = (self.max_labels + self.max_templates) * (4 * self.max_label_chars + 16)
        return self.max_images * (self.max_image_bytes + 1024) + text + 64 * 1024

    @property
    def max_http_body_bytes(self) -> int:
        """The HTTP door's body limit: gRPC's message limit once base64 has grown it by a
        third (JSON carries images as base64), plus room for the JSON around it."""
        return 4 * -(-self.max_message_bytes // 3) + 64 * 1024

    @property
    def max_form_parts(self) -> int:
        """Parts of a multipart classify form: every image, label and template the limits
        allow, and the few other fields."""
        return self.max_images + self.max_labels + self.max_templates + 16

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.decode, self.exif_orientation)

    @property
    def pool_workers(self) -> int:
        """The decoding threads: `preprocess_workers`, or one per available core."""
        return self.preprocess_workers or available_cores()

    @property
    def vocabulary_limits(self) -> VocabularyLimits:
        return VocabularyLimits(self.max_labels, self.max_templates, self.max_label_chars, self.max_prompts)

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> GatewaySettings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = flags.get(field.name)
            if raw is None:
                raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is None:
                continue
            kind = field.type if isinstance(field.type, str) else field.type.__name__
            try:
                if "Path" in kind:
                    values[field.name] = Path(raw)
                elif kind == "int":
                    values[field.name] = int(raw)
                elif kind == "float":
                    values[field.name] = float(raw)
                else:
                    values[field.name] = str(raw)
            except ValueError:
                raise InvalidArgument(f"{field.name}: cannot parse {raw!r} as {kind}") from None
        return cls(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's tuning flags (kebab-case); each also reads CLIPLORA_<NAME>."""
    for field in fields(GatewaySettings):
        if field.name in ("host", "grpc_port", "metrics_port", "http_port", "triton_url", "repository"):
            continue
        default = "none" if field.default is None else field.default
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=None,
                            help=f"default {default} (env {ENV_PREFIX}{field.name.upper()})")
