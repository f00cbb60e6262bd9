"""An fp32 model against its `--target cpu-int8` twin, in this process, side by side.

    python -m cliplora.loadtest.int8_speed --repository model_repository \
        --fp32 pets-base --int8 pets-base-int8 --batches 1,8 --runs 12 --threads 2

No server, no client: two ONNX Runtime sessions (the settings `cliplora predict` uses,
non-spinning threads), fed the same preprocessed crops of the load tester's generated
640x480 JPEGs. Each run times every batch size on both graphs, one after the other
(interleaved), so drift on a shared machine hits both alike. Reports, as JSON on stdout, the
median and p90 milliseconds per batch, the fp32/INT8 ratio of the medians, and how far the
INT8 logits are from the fp32 ones on those images (max and mean |Δlogit|, top-1 agreement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from cliplora.core.preprocess import preprocess_bytes
from cliplora.core.runtime import open_published, run_logits
from cliplora.loadtest.cli import generated_images
from cliplora.loadtest.stats import median_p90_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--fp32", required=True, help="the fp32 model's name")
    parser.add_argument("--int8", required=True, help="its --target cpu-int8 twin's name")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=12, help="timed runs of every batch size on each graph")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of each session")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    models = {name: open_published(args.repository, name, threads=args.threads) for name in (args.fp32, args.int8)}
    size = models[args.fp32].image_size
    crops = np.stack([preprocess_bytes(jpeg, size) for jpeg in generated_images(max(batches))])
    samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in models}
    for run in range(args.warmup + args.runs):
        for batch in batches:
            for name, model in models.items():
                started = time.perf_counter()
                run_logits(model.session, crops[:batch])
                if run >= args.warmup:
                    samples[name][batch].append(time.perf_counter() - started)
        print(f"\rrun {run + 1}/{args.warmup + args.runs}", end="", file=sys.stderr)
    print(file=sys.stderr)

    fp32, int8 = (run_logits(models[name].session, crops) for name in (args.fp32, args.int8))
    difference = np.abs(fp32 - int8)
    report = {
        "fp32": args.fp32, "int8": args.int8, "threads": args.threads, "runs": args.runs,
        "images": f"{len(crops)} generated 640x480 JPEGs, preprocessed to {size}x{size}",
        "batches": {
            str(batch): {
                "fp32": median_p90_ms(samples[args.fp32][batch]), "int8": median_p90_ms(samples[args.int8][batch]),
                "speedup": round(statistics.median(samples[args.fp32][batch])
                                 / statistics.median(samples[args.int8][batch]), 3),
            } for batch in batches
        },
        "max_abs_dlogit": round(float(difference.max()), 5),
        "mean_abs_dlogit": round(float(difference.mean()), 5),
        "top1_agreement": float(np.mean(fp32.argmax(1) == int8.argmax(1))),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
