"""`cliplora bank create | add | remove | list | promote | demote | top`: adapter banks
(README.md "Banks", docs/architecture.md "Adapter banks").

The flags' defaults are `BankOptions`' own (`cliplora.export.bank_options`). `create`,
`add` and `remove` print a JSON summary (name, version, path, the change, the adapters
added with their verification); `list` prints one JSON object per adapter (adapter,
num_classes, rank, matrices, lora_sha256, version_added, promoted_to); `promote` and
`demote` print what they published or took out; `top` prints the bank's adapters by
request rate, from Prometheus. The work itself is imported when a subcommand runs (torch,
ONNX).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cliplora.core import contract, flags, prometheus
from cliplora.core.errors import InvalidArgument
from cliplora.export.bank_options import (
    DEFAULT_PROBES,
    MAX_RANK_LIMIT,
    AdapterSpec,
    BankOptions,
    read_adapters_file,
)
from cliplora.export.model_config import TARGETS
from cliplora.export.options import ExportOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bank_command", required=True, metavar="SUBCOMMAND")
    _add_create(sub.add_parser("create", help="publish version 1 of a bank: the base model alone (adapter 'base')"))
    _add_add(sub.add_parser("add", help="add (or replace) adapters: verified inside the bank, one new version"))
    remove = sub.add_parser("remove", help="a new version without an adapter (its slot is never reused)")
    remove.add_argument("name", metavar="NAME", help="the bank")
    remove.add_argument("--adapter", required=True, metavar="ID", help="the adapter to remove")
    flags.add_repository(remove)
    flags.add_quiet(remove)
    listing = sub.add_parser("list", help="the adapters of the bank's latest version, as JSON")
    listing.add_argument("name", metavar="NAME", help="the bank")
    flags.add_repository(listing)
    _add_promote(sub.add_parser("promote", help=f"serve an adapter merged: export it as the classifier "
                                                f"NAME{contract.PROMOTED_SEPARATOR}ID, where the gateway routes "
                                                "model=NAME, adapter=ID while it is ready"))
    demote = sub.add_parser("demote", help=f"undo promote: remove NAME{contract.PROMOTED_SEPARATOR}ID (the gateway "
                                           "routes the adapter to the bank again)")
    demote.add_argument("name", metavar="NAME", help="the bank")
    demote.add_argument("--adapter", required=True, metavar="ID", help="the promoted adapter")
    flags.add_repository(demote)
    _add_top(sub.add_parser("top", help="the bank's adapters with the most requests per second, from Prometheus "
                                        "(the ones to promote)"))


def _add_create(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the bank's model name ([A-Za-z0-9_-]{1,55}: it reserves "
                                                     f"NAME{contract.ADAPTERS_MODEL_SUFFIX})")
    parser.add_argument("--model", required=True, help="open_clip model name (ViT-B-16, ...) or a JSON model config")
    parser.add_argument("--pretrained", help="open_clip tag, state-dict file or OpenAI .pt archive")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="a random base model when no --pretrained is given (tests and demos only)")
    parser.add_argument("--classes", help="the base model's classes (adapter 'base'): one per line, or a JSON list "
                                          "(default: none, the base answers embeddings only)")
    flags.add_template(parser, flags.EXPORT_TEMPLATE)
    parser.add_argument("--max-rank", type=int, default=BankOptions.max_rank,
                        help=f"the rank every adapter is padded to (exactly), 1..{MAX_RANK_LIMIT}; larger ranks are "
                             f"refused (default {BankOptions.max_rank})")
    parser.add_argument("--matrices", default=",".join(BankOptions.matrices),
                        help="matrices with a branch in every block of the image tower (and of the text "
                             "tower with --open-vocabulary), from q,k,v,o "
                             f"(default {','.join(BankOptions.matrices)})")
    parser.add_argument("--target", choices=TARGETS, default=BankOptions.target,
                        help="cpu-int8: INT8 base weights (the branches stay fp32), each adapter gated at add; "
                             "gpu: TensorRT FP16 blocks in config.pbtxt (not run on a GPU here)")
    parser.add_argument("--open-vocabulary", action="store_true",
                        help="also serve each adapter's text encoder as NAME_text: request-time labels and text "
                             "embeddings per adapter")
    parser.add_argument("--max-batch-size", type=int, default=BankOptions.max_batch_size,
                        help=f"Triton max_batch_size (default {BankOptions.max_batch_size})")
    parser.add_argument("--probes", type=int, default=BankOptions.probes,
                        help=f"probe images for verification (default {BankOptions.probes})")
    flags.add_repository(parser)
    flags.add_quiet(parser)


def _add_add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the bank")
    parser.add_argument("--adapter", metavar="ID", help="the adapter's id (the model-name rule; 'base' is reserved); "
                                                        "an existing id is replaced")
    parser.add_argument("--lora", help="CLIP-LoRA checkpoint file or PEFT adapter folder (what export --lora reads)")
    parser.add_argument("--classes", help="its class names: one per line, or a JSON list")
    flags.add_template(parser, flags.EXPORT_TEMPLATE)
    parser.add_argument("--adapters-file", type=Path, metavar="J",
                        help='instead of the three above: a JSON list of {"adapter", "lora", "classes", '
                             '"template": [...]} added in one version, all or none (paths relative to J)')
    parser.add_argument("--probes", type=int, default=DEFAULT_PROBES,
                        help=f"probe images for each adapter's verification (default {DEFAULT_PROBES})")
    flags.add_repository(parser)
    flags.add_quiet(parser)


def _add_promote(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the bank")
    parser.add_argument("--adapter", required=True, metavar="ID",
                        help=f"the adapter (NAME{contract.PROMOTED_SEPARATOR}ID must fit 64 characters)")
    parser.add_argument("--calibration", type=Path, metavar="DIR",
                        help="cpu-int8 banks: real images for the INT8 accuracy gate (default: the generated probe "
                             "images alone, as `bank add` gates the bank's INT8 answers)")
    parser.add_argument("--probes", type=int, default=ExportOptions.probes,
                        help=f"probe images for the export's verification (default {ExportOptions.probes})")
    flags.add_repository(parser)
    flags.add_quiet(parser)


def _add_top(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the bank")
    parser.add_argument("--prometheus", required=True, metavar="URL",
                        help="Prometheus scraping the gateways (http://host:9090)")
    parser.add_argument("--window", default=prometheus.DEFAULT_WINDOW,
                        help=f"the rate's window, a Prometheus duration (default {prometheus.DEFAULT_WINDOW})")
    parser.add_argument("--limit", type=int, default=prometheus.DEFAULT_LIMIT,
                        help=f"how many adapters, 1..{prometheus.MAX_LIMIT} (default {prometheus.DEFAULT_LIMIT})")


def specs(args: argparse.Namespace) -> list[AdapterSpec]:
    """The adapters `bank add` was given: one by flags, or an --adapters-file."""
    one = [args.adapter, args.lora, args.classes]
    if args.adapters_file is not None:
        if any(v is not None for v in one) or args.template:
            raise InvalidArgument("--adapters-file goes alone: not with --adapter, --lora, --classes or --template")
        return read_adapters_file(args.adapters_file)
    if any(v is None for v in one):
        raise InvalidArgument("bank add needs --adapter, --lora and --classes (or --adapters-file)")
    return [AdapterSpec(args.adapter, args.lora, Path(args.classes), flags.templates(args))]


def run(args: argparse.Namespace) -> int:
    from cliplora.core.progress import Progress

    if args.bank_command in _OTHERS:
        return _OTHERS[args.bank_command](args)
    root = Path(args.repository)
    progress = Progress(quiet=args.quiet)
    if args.bank_command == "create":
        from cliplora.export.bank_create import create_bank

        result = create_bank(BankOptions(
            name=args.name, model=args.model, pretrained=args.pretrained,
            classes=Path(args.classes) if args.classes else None, templates=flags.templates(args),
            max_rank=args.max_rank, matrices=tuple(m.strip() for m in args.matrices.split(",")), target=args.target,
            open_vocabulary=args.open_vocabulary, repository=root, allow_random_weights=args.allow_random_weights,
            max_batch_size=args.max_batch_size, probes=args.probes), progress)
    elif args.bank_command == "add":
        from cliplora.export.bank_update import add_adapters

        result = add_adapters(root, args.name, specs(args), progress, probes=args.probes)
    else:
        from cliplora.export.bank_update import remove_adapter

        result = remove_adapter(root, args.name, args.adapter, progress)
    added = [a for a in result.manifest.adapters if a.version_added == result.version]
    print(json.dumps({
        "name": result.name, "version": result.version, "path": str(result.path), "change": result.manifest.change,
        "adapters": [{**a.listing(), "slot": a.slot,
                      "verification": a.verification.model_dump(mode="json") if a.verification else None}
                     for a in added],
        "seconds": result.manifest.seconds,
    }, indent=2))
    return 0


def _list(args: argparse.Namespace) -> int:
    from cliplora.export.bank_update import list_adapters

    print(json.dumps(list_adapters(Path(args.repository), args.name), indent=2))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from cliplora.core.progress import Progress
    from cliplora.export.bank_promote import promote_adapter

    result = promote_adapter(Path(args.repository), args.name, args.adapter, Progress(quiet=args.quiet),
                             probes=args.probes, calibration=args.calibration)
    summary: dict[str, object] = {"name": args.name, "adapter": args.adapter, "promoted_to": result.model,
                                  "lora_sha256": result.promotion.lora_sha256,
                                  "change": "promoted" if result.export else "already promoted"}
    if result.export is not None:
        summary.update(version=result.export.version, path=str(result.export.path),
                       verification=result.export.manifest.verification.model_dump(mode="json"),
                       export_seconds=result.export.manifest.export_seconds)
    print(json.dumps(summary, indent=2))
    return 0


def _demote(args: argparse.Namespace) -> int:
    from cliplora.export.bank_promotions import demote_adapter

    result = demote_adapter(Path(args.repository), args.name, args.adapter)
    print(json.dumps({"name": result.bank, "adapter": result.adapter, "demoted": result.model,
                      "removed_versions": list(result.versions), "text_model": result.text_model}, indent=2))
    return 0


def _top(args: argparse.Namespace) -> int:
    rates = prometheus.top_adapters(args.prometheus, args.name, args.window, args.limit)
    print(json.dumps([r.to_json() for r in rates], indent=2))
    return 0


_OTHERS = {"list": _list, "promote": _promote, "demote": _demote, "top": _top}  # the rest: one new bank version
