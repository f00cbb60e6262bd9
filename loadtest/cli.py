"""`cliplora loadtest`: interleaved load on the gateway, Triton, or in-process ONNX Runtime."""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from cliplora.core import flags
from cliplora.core.errors import InvalidArgument, NotFound, Unavailable
from cliplora.core.open_vocab import read_names_file, validate_labels, validate_templates
from cliplora.loadtest.entries import GRPC, HTTP, Entry, parse_entry, parse_skew, wants_labels

if TYPE_CHECKING:
    from cliplora.loadtest.targets import Target

PHOTOS = "photos"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="gateway HOST:PORT (or Triton's gRPC HOST:PORT with --direct-triton)")
    parser.add_argument("--http-target", metavar="HOST:PORT",
                        help="the gateway's HTTP door (`cliplora serve --http-port`), for the http: entries")
    parser.add_argument("--models", required=True,
                        help="comma-separated; ratios are against the first. NAME:labels sends the --labels-file "
                             "labels to NAME (request-time labels, warm cache); NAME:labels-cold sends them with a "
                             "fresh suffix each request (every prompt a cache miss); NAME@ID asks adapter ID of bank "
                             "NAME (NAME@ID:labels too); NAME@* each request the next adapter of bank NAME; "
                             "http:ENTRY sends any of these as JSON POST /v1/classify to --http-target instead of "
                             "gRPC to --target (base,http:base: one model through both doors, interleaved)")
    parser.add_argument("--adapter-skew", metavar="zipf:S",
                        help="NAME@* entries draw their adapters Zipf-distributed with exponent S (the bank's first "
                             "adapter the most often) instead of round robin")
    flags.add_labels(parser, inline=False, purpose="for the NAME:labels entries")
    flags.add_template(parser, flags.MODEL_TEMPLATES)
    parser.add_argument("--concurrency", type=int, default=1, help="closed loop: requests in flight (default 1)")
    parser.add_argument("--rate", type=float, help="open loop: requests per second on a fixed schedule")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds (default 30)")
    parser.add_argument("--requests", type=int, help="stop after this many measured requests")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring (default 5)")
    parser.add_argument("--report", required=True, help="folder for report.json, report.md, latency.png")
    parser.add_argument("--images", help="folder of images to send, or 'photos': generated phone photos (4032x3024 "
                                         "and 3024x4032 JPEGs, quality 90, half with an EXIF orientation tag); "
                                         "default: generated 640x480 JPEGs")
    parser.add_argument("--batch", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--direct-triton", action="store_true", help="send uint8 crops straight to Triton")
    parser.add_argument("--raw", action="store_true", help="send raw RGB crops to the gateway (no decoding there)")
    parser.add_argument("--in-process", metavar="REPOSITORY",
                        help="no server: run the models with ONNX Runtime in this process (baseline)")
    parser.add_argument("--prometheus", metavar="URL", help="add server-side figures from this Prometheus")
    parser.add_argument("--scrape-wait", type=float, default=12.0,
                        help="seconds to wait for Prometheus' last scrape (default 12)")
    parser.add_argument("--overhead-bound", type=float, default=0.02,
                        help="verdict: largest allowed slowdown vs the first model (default 0.02)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def generated_images(count: int = 16, seed: int = 0) -> list[bytes]:
    """Photo-sized JPEGs with gradients, blocks and noise (deterministic)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        width, height = (640, 480) if i % 2 == 0 else (480, 640)
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 255 * rng.uniform(0.3, 1)
        blocks = rng.integers(0, 256, (8, 8, 3)).repeat(-(-height // 8), 0).repeat(-(-width // 8), 1)[:height, :width]
        pixels = np.clip(base * 0.6 + blocks * 0.4 + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def folder_images(folder: Path) -> list[bytes]:
    if not folder.is_dir():
        raise NotFound(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidArgument(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return [p.read_bytes() for p in files]


def load_images(images: str | None, seed: int) -> list[bytes]:
    """What ``--images`` names: ``photos`` (`cliplora.loadtest.photos`), a folder, or by default
    the 640x480 JPEGs. A folder called photos is ``./photos``."""
    if images == PHOTOS:
        from cliplora.loadtest.photos import phone_photos

        return phone_photos(seed=seed)
    return folder_images(Path(images)) if images else generated_images(seed=seed)


def _target(args: argparse.Namespace, images: list[bytes], entries: dict[str, Entry]) -> Target:
    """The target of each door the entries use; both doors' behind one `DoorsTarget`."""
    from cliplora.loadtest.targets import DoorsTarget, GatewayTarget, InProcessTarget, TritonTarget

    if args.in_process:
        return InProcessTarget(Path(args.in_process), images, batch=args.batch, workers=args.concurrency)
    doors: dict[str, Target] = {}
    if any(entry.door == GRPC for entry in entries.values()):
        if not args.target:
            raise InvalidArgument("--target HOST:PORT is required (or --in-process REPOSITORY)")
        doors[GRPC] = TritonTarget(args.target, images, batch=args.batch) if args.direct_triton else GatewayTarget(
            args.target, images, batch=args.batch, raw=args.raw, entries=entries,
            adapter_skew=parse_skew(args.adapter_skew), seed=args.seed)
    if any(entry.door == HTTP for entry in entries.values()):
        from cliplora.loadtest.http_door import HttpTarget

        doors[HTTP] = HttpTarget(args.http_target, images, entries=entries, batch=args.batch,
                                 connections=None if args.rate else args.concurrency,
                                 adapter_skew=parse_skew(args.adapter_skew), seed=args.seed)
    return next(iter(doors.values())) if len(doors) == 1 else DoorsTarget(doors, entries)


def _entries(models: list[str], args: argparse.Namespace) -> dict[str, Entry]:
    """Every --models entry parsed (`cliplora.loadtest.entries`), the labels file read once
    for all NAME:labels entries."""
    entries = {text: parse_entry(text) for text in models}
    special = [e.name for e in entries.values() if e.adapter or wants_labels(e.name)]
    if special and (args.direct_triton or args.in_process):
        raise InvalidArgument(f"--models entry {special[0]!r}: labels and adapters go through the gateway")
    if args.adapter_skew is not None and not any(e.every_adapter for e in entries.values()):
        raise InvalidArgument("--adapter-skew goes with a NAME@* entry")
    _check_doors(entries, args)
    if any(wants_labels(text) for text in models):
        if not args.labels_file:
            raise InvalidArgument(f"--models entry {next(t for t in models if wants_labels(t))!r} needs --labels-file")
        labels = tuple(validate_labels(read_names_file(args.labels_file)))
        templates = tuple(validate_templates(args.template) if args.template else ())
        entries = {text: replace(entry, labels=labels, templates=templates) if wants_labels(text) else entry
                   for text, entry in entries.items()}
    return entries


def _check_doors(entries: dict[str, Entry], args: argparse.Namespace) -> None:
    """``http:`` entries go to the gateway's HTTP door, with encoded images, at --http-target;
    --http-target goes with an ``http:`` entry."""
    http = [entry.name for entry in entries.values() if entry.door == HTTP]
    if http and (args.direct_triton or args.in_process or args.raw):
        raise InvalidArgument(f"--models entry {http[0]!r}: the HTTP door takes encoded images to the gateway "
                              "(not with --direct-triton, --in-process or --raw)")
    if http and not args.http_target:
        raise InvalidArgument(f"--models entry {http[0]!r} needs --http-target HOST:PORT (the gateway's HTTP door)")
    if args.http_target and not http:
        raise InvalidArgument("--http-target goes with an http:ENTRY entry in --models (e.g. base,http:base)")


async def _run(args: argparse.Namespace) -> dict:
    from cliplora.loadtest import prom
    from cliplora.loadtest.report import build_report, write_report
    from cliplora.loadtest.runner import run_load

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise InvalidArgument("--models needs at least one model name")
    entries = _entries(models, args)
    if args.concurrency < 1 or args.batch < 1 or args.duration <= 0 or args.warmup < 0:
        raise InvalidArgument("--concurrency and --batch must be >= 1, --duration > 0, --warmup >= 0")
    if args.rate is not None and args.rate <= 0:
        raise InvalidArgument("--rate must be positive")
    if args.prometheus and args.in_process:
        raise InvalidArgument("--prometheus needs a server: the --in-process load has no server-side figures")
    images = load_images(args.images, args.seed)
    target = _target(args, images, entries)
    try:
        await target.start(models)
    except Exception as exc:  # unreachable server, unknown model: say which and stop
        raise Unavailable(f"cannot prepare the load on {target.description}: {exc}") from None
    try:
        result = await run_load(target, models, concurrency=args.concurrency, rate=args.rate,
                                duration_s=args.duration, warmup_s=args.warmup, max_requests=args.requests,
                                progress=not args.quiet)
    finally:
        await target.close()
    report = build_report(result, target=target.description, seed=args.seed)
    if args.prometheus:
        print(f"waiting {args.scrape_wait:.0f} s for Prometheus' last scrape ...", file=sys.stderr)
        served = sorted({entry.model for entry in entries.values()})
        server = per_entry(prom.server_side(args.prometheus, served, result.started_unix, result.ended_unix,
                                            scrape_wait_s=args.scrape_wait), entries)
        report["prometheus"] = server
        if len(models) > 1:  # a verdict compares entries with the first; one entry has nothing to compare
            # Straight to Triton, no gateway saw the load: its figures do not exist, only Triton's are required.
            required = prom.DIRECT_TRITON if args.direct_triton else prom.THROUGH_GATEWAY
            report["verdict"] = prom.verdict(server, models[0], models[1:], args.overhead_bound, required)
    write_report(report, result, Path(args.report))
    return report


def per_entry(server: dict, entries: dict[str, Entry]) -> dict:
    """Prometheus' figures (labelled by model) under each --models entry's name: ``bank@*``
    gets bank's. Entries of one model share its figures: the server side does not tell a
    bank's adapters apart (nor a model's labels requests from its others)."""
    keyed = {k: v for k, v in server.items() if k not in ("gateway", "triton")}
    for section in ("gateway", "triton"):
        figures = server.get(section, {})
        keyed[section] = {name: figures[entry.model] for name, entry in entries.items() if entry.model in figures}
    return keyed


def run(args: argparse.Namespace) -> int:
    from cliplora.loadtest.report import PLOT_FILENAME, render_markdown

    report = asyncio.run(_run(args))
    print(render_markdown(report, plot=f"(plot: {Path(args.report) / PLOT_FILENAME})"))
    return 0
