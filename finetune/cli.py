"""`cliplora finetune`: its flags and its entry point.

Every default is `FinetuneOptions`' or `LoraSpec`'s (`cliplora.finetune.options`: the
paper's recipe), every choice comes from the model library's tables. Prints a JSON
summary; the first Ctrl-C finishes the current step and saves the state (exit 130, with
the command that continues), a second one aborts.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cliplora.core import flags
from cliplora.finetune.options import DEVICES, ITERATIONS_PER_SHOT, FinetuneOptions, LoraSpec
from cliplora.model.lora_targets import ENCODERS, POSITIONS, TARGETS

if TYPE_CHECKING:
    from cliplora.finetune.train import FinetuneResult

CANCELLED = 130  # the shell's status for a run stopped by SIGINT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_and_data(parser)
    _add_lora(parser)
    _add_training(parser)
    flags.add_template(parser, flags.EXPORT_TEMPLATE)
    flags.add_decoding(parser, decode=False)
    parser.add_argument("--device", choices=DEVICES, default=FinetuneOptions.device)
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --output")
    parser.add_argument("--save-every", type=int, default=FinetuneOptions.save_every,
                        help=f"steps between saved states (default {FinetuneOptions.save_every})")
    flags.add_quiet(parser)


def _add_model_and_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="open_clip model name (ViT-B-16, ...) or a JSON model config")
    parser.add_argument("--pretrained", help="open_clip tag, state-dict file or OpenAI .pt archive")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="train on a random model when no --pretrained is given (tests and demos only)")
    parser.add_argument("--data", required=True, help="image folder (one sub-folder per class) or path,label CSV")
    parser.add_argument("--eval-data", help="held-out images (default: the images not drawn as shots)")
    parser.add_argument("--shots", type=int, required=True, help="training images per class")
    parser.add_argument("--seed", type=int, default=FinetuneOptions.seed,
                        help=f"shots, initialisation, order, augmentation (default {FinetuneOptions.seed})")
    parser.add_argument("--output", required=True, help="folder for lora.pt, classes.txt, run.json, state.pt")


def _add_lora(parser: argparse.ArgumentParser) -> None:
    """Where the adapter goes and its hyper-parameters (`LoraSpec`)."""
    spec = LoraSpec()
    parser.add_argument("--encoder", choices=tuple(ENCODERS), default=spec.encoder)
    parser.add_argument("--position", default=spec.position,
                        help=f"blocks to adapt: {', '.join(POSITIONS)} (default {spec.position})")
    parser.add_argument("--params", nargs="+", default=list(spec.params), metavar="P",
                        help=f"projections: {' '.join(TARGETS)} (default {' '.join(spec.params)})")
    parser.add_argument("--r", type=int, default=spec.r, help=f"LoRA rank (default {spec.r})")
    parser.add_argument("--alpha", type=float, default=spec.alpha,
                        help=f"LoRA alpha; scale alpha/sqrt(r) (default {spec.alpha:g})")
    parser.add_argument("--dropout", type=float, default=spec.dropout,
                        help=f"dropout on the LoRA input (default {spec.dropout:g})")


def _add_training(parser: argparse.ArgumentParser) -> None:
    """The optimiser and its schedule."""
    defaults = FinetuneOptions
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"AdamW learning rate (default {defaults.lr:g})")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                        help=f"AdamW weight decay (default {defaults.weight_decay:g})")
    parser.add_argument("--min-lr", type=float, default=defaults.min_lr,
                        help=f"end of the cosine schedule (default {defaults.min_lr:g})")
    parser.add_argument("--iterations", type=int, help=f"training steps (default {ITERATIONS_PER_SHOT} x shots)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)


def options(args: argparse.Namespace) -> FinetuneOptions:
    """The parsed flags as `FinetuneOptions` (checked there)."""
    lora = LoraSpec(encoder=args.encoder, position=args.position, params=tuple("".join(args.params)), r=args.r,
                    alpha=args.alpha, dropout=args.dropout)
    return FinetuneOptions(
        model=args.model, pretrained=args.pretrained, data=Path(args.data),
        eval_data=Path(args.eval_data) if args.eval_data else None, shots=args.shots, output=Path(args.output),
        seed=args.seed, lora=lora, lr=args.lr, weight_decay=args.weight_decay, min_lr=args.min_lr,
        iterations=args.iterations, batch_size=args.batch_size, templates=flags.templates(args),
        device=args.device, allow_random_weights=args.allow_random_weights, resume=args.resume,
        save_every=args.save_every, exif_orientation=args.exif_orientation or FinetuneOptions.exif_orientation,
    )


def run(args: argparse.Namespace) -> int:
    from cliplora.core.progress import Progress
    from cliplora.finetune.train import run_finetune

    settings = options(args)
    result = _until_interrupted(lambda should_stop: run_finetune(settings, Progress(quiet=args.quiet),
                                                                 should_stop=should_stop))
    print(json.dumps(_summary(result), indent=2))
    if result.checkpoint is None:
        print(f"cliplora finetune: CANCELLED: stopped after step {result.steps_done}; "
              f"continue with --resume --output {result.output}", file=sys.stderr)
        return CANCELLED
    return 0


def _until_interrupted(train: Callable[[Callable[[int], bool]], FinetuneResult]) -> FinetuneResult:
    """Run `train(should_stop)`: the first Ctrl-C asks it to stop after the current step
    (and save); the second one raises KeyboardInterrupt as usual."""
    interrupted: list[bool] = []

    def on_interrupt(signum: int, frame: object) -> None:
        interrupted.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        return train(lambda step: bool(interrupted))
    finally:
        signal.signal(signal.SIGINT, previous)


def _summary(result: FinetuneResult) -> dict[str, object]:
    run = result.run
    return {"output": str(result.output), "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "steps_done": result.steps_done, "iterations": run.iterations,
            "zero_shot_top1": run.zero_shot.top1 if run.zero_shot else None,
            "top1": run.accuracy.top1 if run.accuracy else None, "export": run.export}
