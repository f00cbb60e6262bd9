"""The `cliplora` command line: the list of its commands. Arguments are parsed in `main()`,
never at import.

Each command declares its own flags and runs itself (`add_arguments(parser)`,
`run(args) -> int`) in its stage's module; flags several commands share are declared once
in `cliplora.core.flags`. Nothing here, nor in those modules' imports, loads torch, onnx or
ONNX Runtime: they are imported when a command that needs them runs, so `cliplora serve`
starts where they are not installed (the gateway image).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cliplora import evaluate, predict
from cliplora.core import client_commands
from cliplora.core.errors import CliploraError
from cliplora.export import bank_cli
from cliplora.export import cli as export_cli
from cliplora.finetune import cli as finetune_cli
from cliplora.loadtest import cli as loadtest_cli
from cliplora.serve import cli as serve_cli

CANCELLED = 130  # the shell's status for a command stopped by SIGINT


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = (
    Command("export", "merge an adapter, fold the class head, verify, publish ONNX",
            export_cli.add_arguments, export_cli.run),
    Command("finetune", "few-shot CLIP-LoRA training (the paper's recipe); writes lora.pt",
            finetune_cli.add_arguments, finetune_cli.run),
    Command("evaluate", "top-1 accuracy of published models on labelled images", evaluate.add_arguments, evaluate.run),
    Command("predict", "classify images in process with ONNX Runtime", predict.add_arguments, predict.run),
    Command("serve", "run Triton, the gRPC gateway and Prometheus (when installed) locally",
            serve_cli.add_arguments, serve_cli.run),
    Command("classify", "classify images through the gateway (gRPC)",
            client_commands.add_classify_arguments, client_commands.run_classify),
    Command("embed", "image and/or text embeddings through the gateway (--open-vocabulary models)",
            client_commands.add_embed_arguments, client_commands.run_embed),
    Command("loadtest", "interleaved load test with a report (and Prometheus figures)",
            loadtest_cli.add_arguments, loadtest_cli.run),
    Command("bank", "adapter banks: many adapters on one base, one Triton model (create, add, remove, list; "
                    "promote, demote, top)",
            bank_cli.add_arguments, bank_cli.run),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cliplora",
        description="Few-shot CLIP-LoRA adapters as zero-overhead production classifiers on Triton.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        subparser = sub.add_parser(command.name, help=command.help)
        command.add_arguments(subparser)
        subparser.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliploraError as exc:
        print(f"cliplora {args.command}: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cliplora {args.command}: CANCELLED: interrupted", file=sys.stderr)
        return CANCELLED
    except Exception as exc:  # a bug: say so, with the details needed to report it
        if os.environ.get("CLIPLORA_DEBUG"):
            traceback.print_exc()
        print(f"cliplora {args.command}: INTERNAL: {type(exc).__name__}: {exc} "
              "(set CLIPLORA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
