"""Baseline: a minimal PyTorch-eager gRPC server with the same API (what a user would write).

    python -m cliplora.loadtest.eager_server --model ViT-B-16 --lora lora.pt --classes classes.txt \
        --name pets-lora --port 50061 [--pretrained W | --allow-random-weights]

open_clip's own preprocessing (PIL -> torchvision transform), the adapter merged in
PyTorch, the class head from the adapted text encoder, ``model.encode_image`` in eager
mode under ``torch.inference_mode()`` on a worker thread; one request at a time per
worker. No Triton, no ONNX, no batching across requests.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from cliplora.core.predictions import rank
from cliplora.model import head
from cliplora.model.adapters import load_adapter
from cliplora.model.base_model import load_base_model
from cliplora.model.merge import merge_adapter
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc


class EagerClassifier(pb_grpc.ClassifierServicer):
    def __init__(self, args: argparse.Namespace) -> None:
        base = load_base_model(args.model, args.pretrained, allow_random_weights=args.allow_random_weights)
        adapter = load_adapter(args.lora, len(base.text_blocks), len(base.vision_blocks))
        self.model = merge_adapter(base.model, adapter)[0] if adapter else base.model
        self.labels = head.read_classes(args.classes)
        with torch.inference_mode():
            self.text = head.class_text_matrix(self.model, base.tokenizer, self.labels, args.template or [head.DEFAULT_TEMPLATE])
        self.scale = base.logit_scale
        self.name = args.name
        self.transform = open_clip.image_transform(base.image_size, is_train=False, mean=base.mean, std=base.std)
        self.pool = ThreadPoolExecutor(args.workers)

    def _classify(self, images: list[bytes]) -> torch.Tensor:
        batch = torch.stack([self.transform(Image.open(io.BytesIO(data))) for data in images])
        with torch.inference_mode():
            features = F.normalize(self.model.encode_image(batch), dim=-1)
            return self.scale * features @ self.text

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        if request.model != self.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} not found")
        try:
            logits = await asyncio.get_running_loop().run_in_executor(
                self.pool, self._classify, [image.encoded for image in request.images])
        except (OSError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        top_k = request.top_k if request.HasField("top_k") else 5
        return pb.ClassifyResponse(model=self.name, version=1, results=[
            pb.Classification(predictions=[pb.Prediction(label=p.label, index=p.index, score=p.score, logit=p.logit)
                                           for p in rank(row.numpy(), self.labels, top_k)])
            for row in logits])


async def serve(args: argparse.Namespace) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_ClassifierServicer_to_server(EagerClassifier(args), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"PyTorch eager server on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pretrained")
    parser.add_argument("--lora", default="none")
    parser.add_argument("--classes", required=True, type=Path)
    parser.add_argument("--template", action="append")
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--workers", type=int, default=1, help="concurrent forward passes (default 1)")
    parser.add_argument("--allow-random-weights", action="store_true")
    args = parser.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
