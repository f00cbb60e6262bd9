"""Text-encoder throughput: prompts per second through Triton's ``<name>_text`` model.

    python -m cliplora.loadtest.text_throughput --triton 127.0.0.1:8001 --model pets-lora_text \
        --batch 32 --concurrency 2 --seconds 30

Distinct prompts ("a photo of a label-17.") are tokenized once, before the clock starts,
with the gateway's tokenizer; then `concurrency` workers each send `batch` prompts per
request, back to back, for `seconds`. Prints JSON: prompts/s, requests/s, latency
percentiles per request. The figure behind docs/benchmarks.md's "text-encoder throughput".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np

from cliplora.loadtest.stats import summary_ms


async def measure(url: str, model: str, batch: int, concurrency: int, seconds: float, warmup: float) -> dict:
    import tritonclient.grpc.aio as triton_aio

    from cliplora.core import contract
    from cliplora.core.tokenizer import get_tokenizer

    tokens = get_tokenizer()([f"a photo of a label-{i}." for i in range(batch * 16)], contract.CONTEXT_LENGTH)
    batches = [tokens[i : i + batch] for i in range(0, len(tokens), batch)]
    client = triton_aio.InferenceServerClient(url)
    latencies: list[float] = []
    try:
        async def one(chunk: np.ndarray) -> None:
            tensor = triton_aio.InferInput(contract.TEXT_INPUT_NAME, list(chunk.shape), contract.TEXT_INPUT_WIRE_DTYPE)
            tensor.set_data_from_numpy(chunk)
            await client.infer(model, [tensor], outputs=[triton_aio.InferRequestedOutput(contract.TEXT_OUTPUT_NAME)])

        async def worker(offset: int, until: float, record: bool) -> None:
            i = offset
            while time.monotonic() < until:
                started = time.monotonic()
                await one(batches[i % len(batches)])
                if record:
                    latencies.append(time.monotonic() - started)
                i += concurrency

        await asyncio.gather(*(worker(w, time.monotonic() + warmup, False) for w in range(concurrency)))
        started = time.monotonic()
        await asyncio.gather(*(worker(w, started + seconds, True) for w in range(concurrency)))
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    return {"model": model, "batch": batch, "concurrency": concurrency, "seconds": round(elapsed, 2),
            "requests": len(latencies), "prompts_per_s": round(len(latencies) * batch / elapsed, 1),
            "requests_per_s": round(len(latencies) / elapsed, 2),
            "latency_ms": {k: round(v, 1) for k, v in summary_ms(np.array(latencies)).items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", default="127.0.0.1:8001", help="Triton gRPC HOST:PORT")
    parser.add_argument("--model", required=True, help="a text encoder, <name>_text")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.concurrency < 1 or args.seconds <= 0:
        parser.error("--batch and --concurrency must be >= 1, --seconds > 0")
    report = asyncio.run(measure(args.triton, args.model, args.batch, args.concurrency, args.seconds, args.warmup))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
