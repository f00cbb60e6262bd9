"""`cliplora export`: its flags and its entry point.

The flags' defaults and choices are `ExportOptions`' own (`cliplora.export.options`), so
the command line and the library cannot drift apart. Prints a JSON summary: name,
version, path, the verification figures and the export time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cliplora.core import contract, flags
from cliplora.export.model_config import SPINNING, TARGETS
from cliplora.export.options import MAX_BATCH_SIZE_LIMIT, ExportOptions
from cliplora.export.quantize import MIN_IMAGES_FOR_RATE, MIN_TOP1_AGREEMENT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_inputs(parser)
    flags.add_repository(parser)
    _add_graph(parser)
    _add_runtime(parser)
    parser.add_argument("--probes", type=int, default=ExportOptions.probes,
                        help=f"probe images for verification (default {ExportOptions.probes})")
    flags.add_quiet(parser)


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    """What goes in: the base model, the adapter, the classes and templates, the name."""
    parser.add_argument("--model", required=True, help="open_clip model name (ViT-B-16, ...) or a JSON model config")
    parser.add_argument("--pretrained", help="open_clip tag, state-dict file (.pt/.bin/.safetensors) or OpenAI .pt "
                                             "archive")
    parser.add_argument("--lora", required=True, help="CLIP-LoRA checkpoint file, PEFT adapter folder, or 'none'")
    parser.add_argument("--classes", required=True, help="class names: one per line, or a JSON list")
    flags.add_template(parser, flags.EXPORT_TEMPLATE)
    parser.add_argument("--name", required=True, help="model name in the repository ([A-Za-z0-9_-]{1,64})")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="export a random model when no --pretrained is given (tests and demos only)")


def _add_graph(parser: argparse.ArgumentParser) -> None:
    """What comes out: the graph's precision and target, and what it carries."""
    parser.add_argument("--precision", choices=contract.PRECISIONS, default=ExportOptions.precision)
    parser.add_argument("--target", choices=TARGETS, default=ExportOptions.target,
                        help="gpu: TensorRT FP16 with engine cache, one shape profile and warm-up in config.pbtxt "
                             "(still loads on CPU); cpu-int8: an INT8 image tower for CPU serving, published only "
                             f"past an accuracy gate against the fp32 graph; default {ExportOptions.target}")
    agreement = f"{MIN_TOP1_AGREEMENT:.0%}".replace("%", "%%")  # argparse formats help with %
    parser.add_argument("--calibration", type=Path, metavar="DIR",
                        help=f"cpu-int8: images (any depth) the INT8 graph must agree on with the fp32 one, besides "
                             f"the probes (with {MIN_IMAGES_FOR_RATE} or more, top-1 agreement must be at least "
                             f"{agreement})")
    parser.add_argument("--uncalibrated", action="store_true",
                        help="cpu-int8 without --calibration: publish past the logit bound on the generated probe "
                             "images alone (the top-1 agreement rule needs real images)")
    parser.add_argument("--unmerged", action="store_true",
                        help="keep the LoRA branches in the graph (to measure what merging saves)")
    parser.add_argument("--open-vocabulary", action="store_true",
                        help="also publish the adapted text encoder as <name>_text (labels chosen at request "
                             "time, embeddings) and an image_embeds output; the fixed head is unchanged")


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    """How Triton runs it: config.pbtxt's batching and ONNX Runtime parameters."""
    parser.add_argument("--max-batch-size", type=int, default=ExportOptions.max_batch_size,
                        help=f"Triton max_batch_size, 1..{MAX_BATCH_SIZE_LIMIT} (default {ExportOptions.max_batch_size})")
    parser.add_argument("--intra-op-threads", type=int, help="ONNX Runtime intra-op threads per instance "
                        "(a config.pbtxt parameter; default: the cores shared between instances)")
    parser.add_argument("--inter-op-threads", type=int, help="ONNX Runtime inter-op threads (default 1)")
    parser.add_argument("--spinning", choices=SPINNING,
                        help="let idle ONNX Runtime threads spin-wait (local backend; unset: off; auto: only when "
                             "the model is alone in its repository)")


def options(args: argparse.Namespace) -> ExportOptions:
    """The parsed flags as `ExportOptions` (checked there)."""
    return ExportOptions(
        model=args.model, pretrained=args.pretrained, lora=args.lora, classes=Path(args.classes),
        templates=flags.templates(args), name=args.name, repository=Path(args.repository),
        precision=args.precision, target=args.target, unmerged=args.unmerged,
        allow_random_weights=args.allow_random_weights, open_vocabulary=args.open_vocabulary,
        calibration=args.calibration, uncalibrated=args.uncalibrated, intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads, spinning=args.spinning, max_batch_size=args.max_batch_size,
        probes=args.probes,
    )


def run(args: argparse.Namespace) -> int:
    from cliplora.core.progress import Progress
    from cliplora.export.pipeline import run_export

    result = run_export(options(args), Progress(quiet=args.quiet))
    summary = {
        "name": result.name,
        "version": result.version,
        "path": str(result.path),
        "verification": result.manifest.verification.model_dump(mode="json"),
        "export_seconds": result.manifest.export_seconds,
    }
    print(json.dumps(summary, indent=2))
    return 0
