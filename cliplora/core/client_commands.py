"""`cliplora classify` and `cliplora embed`: the gateway client's two commands, their flags
and entry points (the client itself: `cliplora.core.client`, imported when they run).

Both print JSON on stdout; a status the gateway answers with ends the command with a
non-zero exit and its code name on stderr (`cliplora.cli.main`).
"""

from __future__ import annotations

import argparse
import json

from cliplora.core import flags


def _add_call(parser: argparse.ArgumentParser) -> None:
    """Which gateway, which model and version, and the deadline."""
    from cliplora.core.client import DEFAULT_TIMEOUT_S

    parser.add_argument("--target", required=True, help="gateway HOST:PORT")
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", type=int, default=0, help="model version (default: latest)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"deadline in seconds (default {DEFAULT_TIMEOUT_S:g})")
    flags.add_adapter(parser)


def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    _add_call(parser)
    flags.add_top_k(parser)
    flags.add_gateway_access(parser)
    flags.add_labels(parser)
    flags.add_template(parser, flags.MODEL_TEMPLATES)
    parser.add_argument("images", nargs="+", metavar="IMAGE")


def run_classify(args: argparse.Namespace) -> int:
    from cliplora.core.client import classify_files

    results = classify_files(args.target, args.model, args.images, top_k=args.top_k, version=args.version,
                             timeout_s=args.timeout, labels=flags.labels(args), templates=args.template,
                             adapter=args.adapter or "", **flags.gateway_access(args))
    print(json.dumps(results, indent=2))
    return 0


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    _add_call(parser)
    parser.add_argument("--text", action="append", metavar="S", help="a text to embed, as given; repeat for several")
    flags.add_gateway_access(parser)
    parser.add_argument("images", nargs="*", metavar="IMAGE")


def run_embed(args: argparse.Namespace) -> int:
    from cliplora.core.client import embed_files

    results = embed_files(args.target, args.model, args.images, args.text or (), version=args.version,
                          timeout_s=args.timeout, adapter=args.adapter or "", **flags.gateway_access(args))
    print(json.dumps(results))
    return 0
