"""One image, three paths, interleaved: gateway vs Triton direct vs in-process ONNX Runtime.

    python -m cliplora.loadtest.paths --gateway 127.0.0.1:50051 --triton 127.0.0.1:8001 \
        --repository model_repository --model pets-lora --requests 50

Each round sends the same JPEG once through every path, one after another (sequential,
batch 1), so drift on a noisy machine hits all paths alike. Reports medians and p90 in
milliseconds, as JSON on stdout.
  gateway   Classify(encoded JPEG): decode + resize + crop in the gateway, Triton, ranking
  triton    tritonclient gRPC infer of the uint8 crop (what the gateway sends)
  ort       in-process ONNX Runtime on the uint8 crop (no server at all)
  preprocess  decode + resize + crop alone, in process
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import grpc
import tritonclient.grpc as triton_grpc

from cliplora.core import contract
from cliplora.core.preprocess import preprocess_bytes
from cliplora.core.runtime import open_published, run_logits
from cliplora.loadtest.cli import generated_images
from cliplora.loadtest.stats import median_p90_ms
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc


def interleaved(paths: dict[str, Callable[[], None]], warmup: int, requests: int) -> dict[str, list[float]]:
    """Seconds per call of each path, the paths taking turns call by call (`warmup` rounds
    not kept), so that the machine's drift hits them alike."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for round_index in range(warmup + requests):
        for name, call in paths.items():
            started = time.perf_counter()
            call()
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - started)
        print(f"\rround {round_index + 1}/{warmup + requests}", end="", file=sys.stderr)
    print(file=sys.stderr)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gateway vs Triton vs in-process latency, interleaved")
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--triton", required=True, help="Triton gRPC HOST:PORT")
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)

    jpeg = generated_images(1)[0]  # the load tester's first 640x480 JPEG
    published = open_published(args.repository, args.model)
    session = published.session
    crop = preprocess_bytes(jpeg, published.image_size)[None]

    channel = grpc.insecure_channel(args.gateway)
    gateway = pb_grpc.ClassifierStub(channel)
    triton = triton_grpc.InferenceServerClient(args.triton)
    request = pb.ClassifyRequest(model=args.model, images=[pb.Image(encoded=jpeg)], top_k=5)

    def via_gateway() -> None:
        gateway.Classify(request, timeout=60)

    def via_triton() -> None:
        image = triton_grpc.InferInput(contract.INPUT_NAME, list(crop.shape), contract.INPUT_WIRE_DTYPE)
        image.set_data_from_numpy(crop)
        triton.infer(args.model, [image], outputs=[triton_grpc.InferRequestedOutput(contract.OUTPUT_NAME)])

    def in_process() -> None:
        run_logits(session, crop)

    def preprocess() -> None:
        preprocess_bytes(jpeg, published.image_size)

    paths = {"gateway": via_gateway, "triton": via_triton, "ort": in_process, "preprocess": preprocess}
    report = {name: median_p90_ms(values)
              for name, values in interleaved(paths, args.warmup, args.requests).items()}
    report["gateway_minus_triton_median_ms"] = round(report["gateway"]["median_ms"] - report["triton"]["median_ms"], 2)
    report["triton_over_ort_median"] = round(report["triton"]["median_ms"] / report["ort"]["median_ms"], 3)
    report["model"] = args.model
    report["image"] = "640x480 JPEG"
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
