"""Command-line flags that several commands share, each declared once here.

Every command's own module declares the rest of its flags (`add_arguments`) and runs it
(`run`): `cliplora.export.cli`, `cliplora.finetune.cli`, `cliplora.serve.cli`,
`cliplora.loadtest.cli`, `cliplora.predict`, `cliplora.evaluate`,
`cliplora.core.client_commands`; `cliplora.cli` only lists them. Core, because the stages
declare these flags and no stage may import another, nor the command line above them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cliplora.core.errors import NotFound, PermissionDenied
from cliplora.core.open_vocab import DEFAULT_TEMPLATE, labels_argument
from cliplora.core.predictions import DEFAULT_TOP_K
from cliplora.core.preprocess import (
    DECODE_MODES,
    DEFAULT_DECODE,
    ORIENTATIONS,
    REDUCING_GAP,
    Decoding,
)
from cliplora.core.repository import DEFAULT_REPOSITORY

EXPORT_TEMPLATE = repr(DEFAULT_TEMPLATE)  # --template's default where a head is folded (export, finetune)
MODEL_TEMPLATES = "the model's own templates"  # its default where labels are ranked at request time


def add_template(parser: argparse.ArgumentParser, default: str) -> None:
    """``--template T`` (repeatable): prompt templates, averaged (export, finetune, predict,
    classify, evaluate, loadtest); `default` says what applies without one."""
    parser.add_argument("--template", action="append", metavar="TEMPLATE",
                        help=f"prompt template with {{}} where the name goes; repeat to average several "
                             f"(default: {default})")


def templates(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``--template`` values given, in order (none: the command's default applies)."""
    return tuple(args.template or ())


def add_labels(parser: argparse.ArgumentParser, *, inline: bool = True, purpose: str = "to rank instead of the "
               "model's classes (the model must be exported with --open-vocabulary)") -> None:
    """``--labels a,b,c`` (unless not `inline`) and ``--labels-file F``: request-time labels."""
    if inline:
        parser.add_argument("--labels", help=f"labels {purpose}, comma-separated")
    parser.add_argument("--labels-file", help=f"labels {purpose}: one per line, or a JSON list")


def labels(args: argparse.Namespace) -> list[str] | None:
    """The labels `add_labels` flags give; None when neither is given."""
    return labels_argument(getattr(args, "labels", None), args.labels_file)


def add_gateway_access(parser: argparse.ArgumentParser) -> None:
    """How a command reaches a gateway that wants a token and/or TLS (classify, embed, evaluate)."""
    parser.add_argument("--token-file", help="file holding the bearer token (or set CLIPLORA_TOKEN)")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate (PEM): connect with TLS")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client key (PEM), for mutual TLS")


def gateway_access(args: argparse.Namespace) -> dict[str, object]:
    """Keyword arguments for `cliplora.core.client`'s calls from `add_gateway_access` flags."""
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise NotFound(f"--token-file not found: {args.token_file}") from None
        except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
            raise PermissionDenied(f"cannot read --token-file {args.token_file}: {exc}") from None
    return {"token": token, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}


def add_repository(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default=str(DEFAULT_REPOSITORY),
                        help=f"Triton model repository folder (default {DEFAULT_REPOSITORY})")


def add_top_k(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                        help=f"classes per image, 0 for all (default {DEFAULT_TOP_K})")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def add_adapter(parser: argparse.ArgumentParser) -> None:
    """``--adapter ID``: one adapter of a bank (classify, embed, predict)."""
    parser.add_argument("--adapter", metavar="ID",
                        help="the adapter of a bank to use (`cliplora bank list`); default: the bank's base")


def add_decoding(parser: argparse.ArgumentParser, *, decode: bool = True) -> None:
    """``--decode exact|fast`` (unless not `decode`) and ``--exif-orientation apply|ignore``: how
    image files become pixels (`cliplora.core.preprocess`, README "Phone photos"); predict, evaluate,
    finetune (the orientation only). Unset, `decoding` gives the defaults."""
    if decode:
        parser.add_argument("--decode", choices=DECODE_MODES,
                            help=f"exact: every pixel decoded (open_clip's preprocessing bit for bit); fast: a JPEG "
                                 f"is scaled in the decoder to at least {REDUCING_GAP:g}x the resize target first, "
                                 f"images too small for that decode as exact (default {DEFAULT_DECODE})")
    parser.add_argument("--exif-orientation", choices=ORIENTATIONS,
                        help="apply: turn photos upright by their EXIF orientation tag, as people see them; "
                             "ignore: the stored pixels, as open_clip reads them (default apply)")


def decoding(args: argparse.Namespace) -> Decoding:
    """The `add_decoding` flags' choice, defaults where unset."""
    return Decoding(getattr(args, "decode", None) or DEFAULT_DECODE, args.exif_orientation or "apply")


def decoding_given(args: argparse.Namespace) -> bool:
    """Whether `add_decoding` flags were given (a command that does not decode refuses them)."""
    return getattr(args, "decode", None) is not None or args.exif_orientation is not None
