"""The `cliplora` command line. Arguments are parsed in `main()`, never at import."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from cliplora.core.errors import CliploraError
from cliplora.core.repository import DEFAULT_REPOSITORY


def _add_gateway_access(parser: argparse.ArgumentParser) -> None:
    """How a command reaches a gateway that wants a token and/or TLS (classify, evaluate)."""
    parser.add_argument("--token-file", help="file holding the bearer token (or set CLIPLORA_TOKEN)")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate (PEM): connect with TLS")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client key (PEM), for mutual TLS")


def _gateway_access(args: argparse.Namespace) -> dict[str, object]:
    """Keyword arguments for `cliplora.core.client.classify_files` from `_add_gateway_access` flags."""
    from cliplora.core.errors import NotFound, PermissionDenied

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise NotFound(f"--token-file not found: {args.token_file}") from None
        except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
            raise PermissionDenied(f"cannot read --token-file {args.token_file}: {exc}") from None
    return {"token": token, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}


def _export(args: argparse.Namespace) -> int:
    from cliplora.core.progress import Progress
    from cliplora.export.pipeline import ExportOptions, run_export

    options = ExportOptions(
        model=args.model,
        pretrained=args.pretrained,
        lora=args.lora,
        classes=Path(args.classes),
        templates=tuple(args.template or ()),
        name=args.name,
        repository=Path(args.repository),
        precision=args.precision,
        target=args.target,
        unmerged=args.unmerged,
        allow_random_weights=args.allow_random_weights,
        open_vocabulary=args.open_vocabulary,
        calibration=args.calibration,
        intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads,
        spinning=args.spinning,
        max_batch_size=args.max_batch_size,
        probes=args.probes,
    )
    result = run_export(options, Progress(quiet=args.quiet))
    summary = {
        "name": result.name,
        "version": result.version,
        "path": str(result.path),
        "verification": result.manifest.verification.model_dump(mode="json"),
        "export_seconds": result.manifest.export_seconds,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    import signal

    from cliplora.core.progress import Progress
    from cliplora.finetune.lora_layers import LoraSpec
    from cliplora.finetune.train import FinetuneOptions, run_finetune

    options = FinetuneOptions(
        model=args.model,
        pretrained=args.pretrained,
        data=Path(args.data),
        eval_data=Path(args.eval_data) if args.eval_data else None,
        shots=args.shots,
        output=Path(args.output),
        seed=args.seed,
        lora=LoraSpec(encoder=args.encoder, position=args.position, params=tuple("".join(args.params)),
                      r=args.r, alpha=args.alpha, dropout=args.dropout),
        lr=args.lr,
        weight_decay=args.weight_decay,
        min_lr=args.min_lr,
        iterations=args.iterations,
        batch_size=args.batch_size,
        templates=tuple(args.template or ()),
        device=args.device,
        allow_random_weights=args.allow_random_weights,
        resume=args.resume,
        save_every=args.save_every,
    )
    # The first Ctrl-C finishes the current step and saves the state; a second one aborts.
    interrupted: list[bool] = []

    def on_interrupt(signum: int, frame: object) -> None:
        interrupted.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        result = run_finetune(options, Progress(quiet=args.quiet), should_stop=lambda step: bool(interrupted))
    finally:
        signal.signal(signal.SIGINT, previous)
    run = result.run
    summary = {"output": str(result.output), "checkpoint": str(result.checkpoint) if result.checkpoint else None,
               "steps_done": result.steps_done, "iterations": run.iterations,
               "zero_shot_top1": run.zero_shot.top1 if run.zero_shot else None,
               "top1": run.accuracy.top1 if run.accuracy else None, "export": run.export}
    print(json.dumps(summary, indent=2))
    if result.checkpoint is None:
        print(f"cliplora finetune: CANCELLED: stopped after step {result.steps_done}; "
              f"continue with --resume --output {result.output}", file=sys.stderr)
        return 130
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cliplora.core.datasets import read_labelled_images
    from cliplora.core.progress import Progress
    from cliplora.evaluate import evaluate_model

    data = read_labelled_images(args.data)
    access = _gateway_access(args) if args.target else {}
    progress = Progress(quiet=args.quiet)
    labels = _labels(args)
    models = {
        name: evaluate_model(data, name, repository=Path(args.repository), target=args.target,
                             version=args.version, access=access, progress=progress, labels=labels,
                             templates=args.template)
        for name in args.name
    }
    print(json.dumps({"data": data.source, "images": len(data), "models": models}, indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from cliplora.predict import predict_files

    results = predict_files(args.repository, args.name, args.images, top_k=args.top_k, version=args.version,
                            labels=_labels(args), templates=args.template)
    print(json.dumps(results, indent=2))
    return 0


def _classify(args: argparse.Namespace) -> int:
    from cliplora.core.client import classify_files

    results = classify_files(args.target, args.model, args.images, top_k=args.top_k, version=args.version,
                             timeout_s=args.timeout, labels=_labels(args), templates=args.template,
                             **_gateway_access(args))
    print(json.dumps(results, indent=2))
    return 0


def _embed(args: argparse.Namespace) -> int:
    from cliplora.core.client import embed_files

    results = embed_files(args.target, args.model, args.images, args.text or (), version=args.version,
                          timeout_s=args.timeout, **_gateway_access(args))
    print(json.dumps(results))
    return 0


def _add_vocabulary(parser: argparse.ArgumentParser) -> None:
    """Request-time labels (models exported with --open-vocabulary): classify, predict, evaluate."""
    parser.add_argument("--labels", help="labels to rank instead of the model's classes, comma-separated "
                                         "(the model must be exported with --open-vocabulary)")
    parser.add_argument("--labels-file", help="labels to rank: one per line, or a JSON list")
    parser.add_argument("--template", action="append", metavar="TEMPLATE",
                        help="prompt template with {} for the label; repeat to average several "
                             "(default: the model's own templates)")


def _labels(args: argparse.Namespace) -> list[str] | None:
    from cliplora.core.open_vocab import labels_argument

    return labels_argument(getattr(args, "labels", None), args.labels_file)


def _loadtest(args: argparse.Namespace) -> int:
    from cliplora.loadtest.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cliplora",
        description="Few-shot CLIP-LoRA adapters as zero-overhead production classifiers on Triton.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = sub.add_parser("export", help="merge an adapter, fold the class head, verify, publish ONNX")
    export.add_argument("--model", required=True, help="open_clip model name (ViT-B-16, ...) or a JSON model config")
    export.add_argument("--pretrained", help="open_clip tag, state-dict file (.pt/.bin/.safetensors) or OpenAI .pt archive")
    export.add_argument("--lora", required=True, help="CLIP-LoRA checkpoint file, PEFT adapter folder, or 'none'")
    export.add_argument("--classes", required=True, help="class names: one per line, or a JSON list")
    export.add_argument("--template", action="append", metavar="TEMPLATE",
                        help="prompt template with {} for the class name; repeat to average several "
                             "(default: 'a photo of a {}.')")
    export.add_argument("--name", required=True, help="model name in the repository ([A-Za-z0-9_-]{1,64})")
    export.add_argument("--repository", default=str(DEFAULT_REPOSITORY), help="Triton model repository folder")
    export.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    export.add_argument("--target", choices=("portable", "gpu", "cpu-int8"), default="portable",
                        help="gpu: TensorRT FP16 with engine cache, one shape profile and warm-up in config.pbtxt "
                             "(still loads on CPU); cpu-int8: an INT8 image tower for CPU serving, published only "
                             "past an accuracy gate against the fp32 graph; default portable")
    export.add_argument("--calibration", type=Path, metavar="DIR",
                        help="cpu-int8: images (any depth) the INT8 graph must agree on with the fp32 one, "
                             "besides the probes (with 100 or more, top-1 agreement must be at least 99%%)")
    export.add_argument("--intra-op-threads", type=int, help="ONNX Runtime intra-op threads per instance "
                        "(a config.pbtxt parameter; default: the cores shared between instances)")
    export.add_argument("--inter-op-threads", type=int, help="ONNX Runtime inter-op threads (default 1)")
    export.add_argument("--spinning", choices=("auto", "on", "off"),
                        help="let idle ONNX Runtime threads spin-wait (local backend; unset: off; auto: only when "
                             "the model is alone in its repository)")
    export.add_argument("--unmerged", action="store_true",
                        help="keep the LoRA branches in the graph (to measure what merging saves)")
    export.add_argument("--allow-random-weights", action="store_true",
                        help="export a random model when no --pretrained is given (tests and demos only)")
    export.add_argument("--open-vocabulary", action="store_true",
                        help="also publish the adapted text encoder as <name>_text (labels chosen at request "
                             "time, embeddings) and an image_embeds output; the fixed head is unchanged")
    export.add_argument("--max-batch-size", type=int, default=32, help="Triton max_batch_size (default 32)")
    export.add_argument("--probes", type=int, default=8, help="probe images for verification (default 8)")
    export.add_argument("--quiet", action="store_true", help="no progress output")
    export.set_defaults(func=_export)

    finetune = sub.add_parser("finetune", help="few-shot CLIP-LoRA training (the paper's recipe); writes lora.pt")
    finetune.add_argument("--model", required=True, help="open_clip model name (ViT-B-16, ...) or a JSON model config")
    finetune.add_argument("--pretrained", help="open_clip tag, state-dict file or OpenAI .pt archive")
    finetune.add_argument("--allow-random-weights", action="store_true",
                          help="train on a random model when no --pretrained is given (tests and demos only)")
    finetune.add_argument("--data", required=True, help="image folder (one sub-folder per class) or path,label CSV")
    finetune.add_argument("--eval-data", help="held-out images (default: the images not drawn as shots)")
    finetune.add_argument("--shots", type=int, required=True, help="training images per class")
    finetune.add_argument("--seed", type=int, default=1, help="shots, initialisation, order, augmentation (default 1)")
    finetune.add_argument("--output", required=True, help="folder for lora.pt, classes.txt, run.json, state.pt")
    finetune.add_argument("--encoder", choices=("text", "vision", "both"), default="both")
    finetune.add_argument("--position", default="all", help="blocks to adapt: all, bottom, mid, up, half-up, "
                          "half-bottom, top, top1, top2, top3 (default all)")
    finetune.add_argument("--params", nargs="+", default=["q", "k", "v"], metavar="P",
                          help="projections: q k v o (default q k v)")
    finetune.add_argument("--r", type=int, default=2, help="LoRA rank (default 2)")
    finetune.add_argument("--alpha", type=float, default=1.0, help="LoRA alpha; scale alpha/sqrt(r) (default 1)")
    finetune.add_argument("--dropout", type=float, default=0.25, help="dropout on the LoRA input (default 0.25)")
    finetune.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    finetune.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default 1e-2)")
    finetune.add_argument("--min-lr", type=float, default=1e-6, help="end of the cosine schedule (default 1e-6)")
    finetune.add_argument("--iterations", type=int, help="training steps (default 500 x shots)")
    finetune.add_argument("--batch-size", type=int, default=32)
    finetune.add_argument("--template", action="append", metavar="TEMPLATE",
                          help="prompt template with {}; repeat to average (default: 'a photo of a {}.')")
    finetune.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    finetune.add_argument("--resume", action="store_true", help="continue the run saved in --output")
    finetune.add_argument("--save-every", type=int, default=100, help="steps between saved states (default 100)")
    finetune.add_argument("--quiet", action="store_true", help="no progress output")
    finetune.set_defaults(func=_finetune)

    evaluate = sub.add_parser("evaluate", help="top-1 accuracy of published models on labelled images")
    evaluate.add_argument("--data", required=True, help="image folder (one sub-folder per class) or path,label CSV")
    evaluate.add_argument("--name", action="append", required=True,
                          help="published model; repeat to compare (e.g. the --lora none base)")
    evaluate.add_argument("--repository", default=str(DEFAULT_REPOSITORY))
    evaluate.add_argument("--version", type=int, help="model version (default: latest)")
    evaluate.add_argument("--target", help="gateway HOST:PORT: evaluate what is served, not the file")
    _add_gateway_access(evaluate)
    evaluate.add_argument("--labels-file", help="score against these labels instead of the model's classes (one per "
                                                "line, or a JSON list; needs --open-vocabulary models)")
    evaluate.add_argument("--template", action="append", metavar="TEMPLATE",
                          help="with --labels-file: prompt template with {}; repeat to average (default: the model's)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress output")
    evaluate.set_defaults(func=_evaluate)

    predict = sub.add_parser("predict", help="classify images in process with ONNX Runtime")
    predict.add_argument("--repository", default=str(DEFAULT_REPOSITORY))
    predict.add_argument("--name", required=True)
    predict.add_argument("--version", type=int, help="model version (default: latest)")
    predict.add_argument("--top-k", type=int, default=5, help="classes per image, 0 for all (default 5)")
    _add_vocabulary(predict)
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.set_defaults(func=_predict)

    from cliplora.serve import cli as serve_cli

    serve = sub.add_parser("serve", help="run Triton, the gRPC gateway and Prometheus (when installed) locally")
    serve_cli.add_arguments(serve)
    serve.set_defaults(func=serve_cli.run)

    classify = sub.add_parser("classify", help="classify images through the gateway (gRPC)")
    classify.add_argument("--target", required=True, help="gateway HOST:PORT")
    classify.add_argument("--model", required=True)
    classify.add_argument("--version", type=int, default=0, help="model version (default: latest)")
    classify.add_argument("--top-k", type=int, default=5, help="classes per image, 0 for all (default 5)")
    classify.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default 30)")
    _add_gateway_access(classify)
    _add_vocabulary(classify)
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    classify.set_defaults(func=_classify)

    embed = sub.add_parser("embed", help="image and/or text embeddings through the gateway (--open-vocabulary models)")
    embed.add_argument("--target", required=True, help="gateway HOST:PORT")
    embed.add_argument("--model", required=True)
    embed.add_argument("--version", type=int, default=0, help="model version (default: latest)")
    embed.add_argument("--text", action="append", metavar="S", help="a text to embed, as given; repeat for several")
    embed.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default 30)")
    _add_gateway_access(embed)
    embed.add_argument("images", nargs="*", metavar="IMAGE")
    embed.set_defaults(func=_embed)

    loadtest = sub.add_parser("loadtest", help="interleaved load test with a report (and Prometheus figures)")
    from cliplora.loadtest.cli import add_arguments as add_loadtest_arguments

    add_loadtest_arguments(loadtest)
    loadtest.set_defaults(func=_loadtest)
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
        return 130
    except Exception as exc:  # a bug: say so, with the details needed to report it
        if os.environ.get("CLIPLORA_DEBUG"):
            traceback.print_exc()
        print(f"cliplora {args.command}: INTERNAL: {type(exc).__name__}: {exc} "
              "(set CLIPLORA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
