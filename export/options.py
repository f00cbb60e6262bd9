"""What `cliplora export` takes, checked before anything runs: `ExportOptions`.

Its defaults are the constants of the modules that own them (`contract.DEFAULT_MAX_BATCH_SIZE`,
`verify.DEFAULT_PROBES`, `model_config.TARGETS`, ...); `cliplora.export.cli` declares the
command's flags from them. No torch here, so the command line starts without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cliplora.core import contract
from cliplora.core.errors import InvalidArgument
from cliplora.core.repository import DEFAULT_REPOSITORY, validate_model_name
from cliplora.export import quantize, verify
from cliplora.export.model_config import TARGETS, RuntimeParameters

MAX_BATCH_SIZE_LIMIT = 1024


@dataclass(frozen=True)
class ExportOptions:
    """Everything `cliplora export` takes (the README's "Export" table)."""

    model: str
    pretrained: str | None
    lora: str
    classes: Path
    templates: tuple[str, ...]
    name: str
    repository: Path = DEFAULT_REPOSITORY
    precision: str = contract.PRECISIONS[0]
    target: str = TARGETS[0]  # "gpu": TensorRT FP16, engine cache and warm-up in config.pbtxt
    unmerged: bool = False
    allow_random_weights: bool = False
    max_batch_size: int = contract.DEFAULT_MAX_BATCH_SIZE
    probes: int = verify.DEFAULT_PROBES
    open_vocabulary: bool = False  # also publish the adapted text encoder as <name>_text
    calibration: Path | None = None  # cpu-int8: real images for the accuracy gate
    uncalibrated: bool = False  # cpu-int8 without --calibration: the gate's logit bound on the probes alone
    intra_op_threads: int | None = None  # ONNX Runtime model parameters (export/model_config.py)
    inter_op_threads: int | None = None
    spinning: str | None = None  # auto | on | off
    promotion: contract.Promotion | None = None  # `cliplora bank promote`: the bank adapter this export serves

    def __post_init__(self) -> None:
        validate_model_name(self.name)
        self._check_promotion()
        if self.precision not in contract.PRECISIONS:
            raise InvalidArgument(f"--precision must be one of {', '.join(contract.PRECISIONS)}, "
                                  f"got {self.precision!r}")
        if self.target not in TARGETS:
            raise InvalidArgument(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not 1 <= self.max_batch_size <= MAX_BATCH_SIZE_LIMIT:
            raise InvalidArgument(f"max batch size must be 1..{MAX_BATCH_SIZE_LIMIT}, got {self.max_batch_size}")
        if self.probes < 1:
            raise InvalidArgument("at least one probe image is needed")
        if self.target == "cpu-int8" and self.precision != "fp32":
            raise InvalidArgument("--target cpu-int8 quantizes the fp32 graph to INT8: it does not go with "
                                  f"--precision {self.precision}")
        if self.calibration is not None and self.target != "cpu-int8":
            raise InvalidArgument("--calibration feeds the INT8 accuracy gate: it goes with --target cpu-int8")
        self._check_calibration()
        try:
            RuntimeParameters(self.intra_op_threads, self.inter_op_threads, self.spinning)
        except ValueError as exc:
            raise InvalidArgument(str(exc).replace("_", "-").replace("intra-op-threads", "--intra-op-threads")
                                  .replace("inter-op-threads", "--inter-op-threads")) from None

    def _check_promotion(self) -> None:
        """A promoted adapter is published under its bank's name for it, and names its content."""
        if self.promotion is None:
            return
        expected = contract.promoted_model_name(self.promotion.bank, self.promotion.adapter)
        if self.name != expected:
            raise InvalidArgument(f"adapter {self.promotion.adapter!r} of bank {self.promotion.bank!r} is promoted "
                                  f"as {expected!r}, not {self.name!r}")
        if not self.promotion.lora_sha256:
            raise InvalidArgument(f"promoting {expected!r} needs the adapter's content hash")

    def _check_calibration(self) -> None:
        """cpu-int8 asks for real images to gate on, or for ``--uncalibrated`` (export/quantize.py)."""
        if self.uncalibrated and not self.int8:
            raise InvalidArgument("--uncalibrated is about the INT8 accuracy gate: it goes with --target cpu-int8")
        if self.uncalibrated and self.calibration is not None:
            raise InvalidArgument("--uncalibrated means no --calibration images: give one or the other")
        if self.int8 and self.calibration is None and not self.uncalibrated:
            raise InvalidArgument(
                "--target cpu-int8 gates the INT8 graph against the fp32 one on real images: give --calibration DIR "
                f"(with {quantize.MIN_IMAGES_FOR_RATE} or more, at least {quantize.MIN_TOP1_AGREEMENT:.0%} of their "
                "top-1 answers must agree), or --uncalibrated to publish on the logit bound over the generated probe "
                "images alone")

    @property
    def runtime(self) -> RuntimeParameters:
        return RuntimeParameters(self.intra_op_threads, self.inter_op_threads, self.spinning)

    @property
    def int8(self) -> bool:
        """`--target cpu-int8`: the verified fp32 graph is quantized before it is published."""
        return self.target == "cpu-int8"

    @property
    def graph_precision(self) -> str:
        """What the published graph computes in: int8 for cpu-int8, else --precision."""
        return "int8" if self.int8 else self.precision
