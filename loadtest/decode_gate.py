"""The gate for ``--decode fast``: how far DCT-scaled decoding moves a published model.

    python -m cliplora.loadtest.decode_gate --repository R --name N [--gaps 1.5,2,3,4] \\
        [--per-size 4] [--folder NAME=DIR ...] > gate.json

For each image set and each candidate reducing gap it compares ``fast`` with ``exact``
through the published ONNX graph: the largest logit difference (at the model's logit
scale and rescaled to 100, OpenAI CLIP's), top-1 agreement, the smallest exact top-1
margin (a flip is only possible below the logit difference), pixel differences of the
crops, the DCT scales the decoder used and the CPU time of each preprocessing. With an
``image_embeds`` output (``--open-vocabulary``) it also gives 100 x the largest change
of the unit image embedding: a bound on the logit difference for *any* class at logit
scale 100. The sets: generated photos (`cliplora.loadtest.photos`) at 12, 8, 4, 2 and
0.3 MP, half of them with an orientation tag, the load test's default 640x480 JPEGs,
and every ``--folder`` given (e.g. the demo and test images). ``verdict`` applies the
rule for the default: ``fast`` may be the default only with every top-1 kept and every
logit within 0.05 at logit scale 100.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cliplora.core import contract
from cliplora.core.preprocess import Decoding, dct_scale, preprocess_bytes
from cliplora.core.runtime import PublishedModel, open_published, run_image_embeddings, run_logits
from cliplora.loadtest.cli import IMAGE_SUFFIXES, generated_images
from cliplora.loadtest.photos import jpeg_bytes, photo_like

MEGAPIXELS = {"12": (4032, 3024), "8": (3264, 2448), "4": (2304, 1728), "2": (1632, 1224), "0.3": (640, 480)}
LOGIT_BOUND = 0.05  # at logit scale 100
REFERENCE_SCALE = 100.0


@dataclass
class Outputs:
    """What the graph answers for a set's crops under one decoding."""

    logits: np.ndarray
    embeds: np.ndarray | None
    crops: np.ndarray
    cpu_ms: list[float]


def photo_set(width: int, height: int, count: int, seed: int) -> list[bytes]:
    """`count` photo-like JPEGs (quality 90), landscape and portrait in turn, every other
    pair with the orientation tag of a turned phone (6 / 8)."""
    images = []
    for i in range(count):
        w, h = (width, height) if i % 2 == 0 else (height, width)
        orientation = (6 if i % 2 == 0 else 8) if (i // 2) % 2 == 1 else None
        images.append(jpeg_bytes(photo_like(w, h, seed=seed + i, detail=1.0 + (i % 4) / 3), orientation=orientation))
    return images


def run_set(model: PublishedModel, images: list[bytes], decoding: Decoding, embeds: bool) -> Outputs:
    crops, cpu_ms = [], []
    for data in images:
        started = time.thread_time()
        crops.append(preprocess_bytes(data, model.image_size, decoding=decoding))
        cpu_ms.append((time.thread_time() - started) * 1e3)
    batch = np.stack(crops)
    return Outputs(run_logits(model.session, batch), run_image_embeddings(model.session, batch) if embeds else None,
                   batch, cpu_ms)


def dct_scales(images: Iterable[bytes], size: int, gap: float) -> dict[str, int]:
    """How often the decoder scaled by 1, 2, 4 or 8."""
    counts: dict[str, int] = {}
    for data in images:
        scale = str(dct_scale(data, size, Decoding("fast", reducing_gap=gap)))
        counts[scale] = counts.get(scale, 0) + 1
    return counts


def compare(exact: Outputs, fast: Outputs, logit_scale: float) -> dict[str, Any]:
    delta = float(np.abs(fast.logits - exact.logits).max())
    ranked = np.sort(exact.logits, axis=1)
    pixels = np.abs(fast.crops.astype(np.int16) - exact.crops)
    figures = {
        "max_abs_dlogit": delta,
        "max_abs_dlogit_at_100": delta * REFERENCE_SCALE / logit_scale,
        "top1_agreement": float((fast.logits.argmax(1) == exact.logits.argmax(1)).mean()),
        "min_top1_margin_at_100": float((ranked[:, -1] - ranked[:, -2]).min() * REFERENCE_SCALE / logit_scale),
        "max_abs_dpixel": int(pixels.max()),
        "mean_abs_dpixel": round(float(pixels.mean()), 4),
        "identical_crops": int(sum(np.array_equal(a, b) for a, b in zip(fast.crops, exact.crops, strict=True))),
        "cpu_ms_median": round(float(np.median(fast.cpu_ms)), 2),
    }
    if exact.embeds is not None and fast.embeds is not None:
        figures["any_class_bound_at_100"] = float(np.linalg.norm(fast.embeds - exact.embeds, axis=1).max()) * REFERENCE_SCALE
    return figures


def gate_set(model: PublishedModel, images: list[bytes], gaps: list[float], logit_scale: float,
             embeds: bool) -> dict[str, Any]:
    exact = run_set(model, images, Decoding("exact"), embeds)
    result: dict[str, Any] = {"images": len(images), "mean_bytes": int(np.mean([len(d) for d in images])),
                              "exact_cpu_ms_median": round(float(np.median(exact.cpu_ms)), 2), "gaps": {}}
    for gap in gaps:
        fast = run_set(model, images, Decoding("fast", reducing_gap=gap), embeds)
        result["gaps"][f"{gap:g}"] = {"dct_scales": dct_scales(images, model.image_size, gap),
                                      **compare(exact, fast, logit_scale)}
    return result


def verdict(sets: dict[str, dict[str, Any]], gaps: list[float]) -> dict[str, Any]:
    """Per gap: the worst figures over every set, and whether ``fast`` may be the default."""
    out = {}
    for gap in (f"{g:g}" for g in gaps):
        rows = [s["gaps"][gap] for s in sets.values()]
        worst = max(r["max_abs_dlogit_at_100"] for r in rows)
        agreement = min(r["top1_agreement"] for r in rows)
        out[gap] = {"max_abs_dlogit_at_100": worst, "min_top1_agreement": agreement,
                    "fast_may_be_default": bool(agreement == 1.0 and worst <= LOGIT_BOUND)}
    return out


def image_sets(args: argparse.Namespace) -> dict[str, list[bytes]]:
    sets = {f"photos-{mp}MP": photo_set(*size, args.per_size, seed=100 * i + args.seed)
            for i, (mp, size) in enumerate(MEGAPIXELS.items())}
    sets["loadtest-640x480"] = generated_images(seed=args.seed)
    for entry in args.folder:
        name, _, folder = entry.partition("=")
        if not folder:
            raise SystemExit(f"--folder takes NAME=DIR, got {entry!r}")
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"--folder {entry}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
        sets[name] = [p.read_bytes() for p in files]
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="--decode fast vs exact through a published model")
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--name", required=True)
    parser.add_argument("--gaps", default="1.5,2,3,4", help="candidate reducing gaps, comma-separated")
    parser.add_argument("--per-size", type=int, default=4, help="generated photos per megapixel size (default 4)")
    parser.add_argument("--folder", action="append", default=[], metavar="NAME=DIR",
                        help="another image set: every file under DIR (repeat)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",")]
    model = open_published(args.repository, args.name)
    manifest = model.found.manifest()
    embeds = contract.EMBEDS_NAME in {o.name for o in model.session.get_outputs()}
    sets = {name: gate_set(model, images, gaps, manifest.base.logit_scale, embeds)
            for name, images in image_sets(args).items()}
    report = {"model": {"name": args.name, "version": model.found.version, "base": manifest.base.model,
                        "weights": manifest.base.weights.source, "precision": manifest.precision,
                        "logit_scale": manifest.base.logit_scale, "classes": len(model.labels())},
              "sets": sets, "verdict": verdict(sets, gaps)}
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
