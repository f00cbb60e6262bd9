"""`cliplora finetune`: few-shot CLIP-LoRA training with the paper's recipe.

Recipe (Zanella & Ben Ayed, CVPR 2024 workshops, and their code's defaults): LoRA of
rank 2, alpha 1 on q/k/v of every block of both encoders; dropout 0.25 on the branch
input; AdamW (lr 2e-4, weight decay 1e-2, betas 0.9/0.999); cosine schedule down to
1e-6 over 500 × shots iterations of batch 32; loss = cross-entropy of 100 × cosine
similarity between the image features and the class prompt features, recomputed with
the adapted text encoder at every step; mixed precision on GPU. Only the LoRA factors
train; the zero-shot model is the starting point (B = 0).

Outputs in ``--output``: ``lora.pt`` (the paper's checkpoint format, read by
``cliplora export --lora`` and by the paper's code), ``classes.txt``, ``run.json``
(arguments, seed, losses, accuracies), ``train.csv`` / ``heldout.csv`` (the split) and
``state.pt`` (everything needed to resume exactly where a run stopped).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cliplora
from cliplora.datasets import LabelledImages, few_shot_split, read_labelled_images
from cliplora.errors import FailedPrecondition, InvalidArgument, NotFound
from cliplora.evaluate import accuracy_report
from cliplora.preprocess import preprocess_file
from cliplora.progress import Progress
from export.base_model import BaseModel, load_base_model
from export.hashing import sha256_file
from export.head import class_embeddings, prompt_tokens, validate_classes, validate_templates
from export.onnx_graph import ClassifierGraph
from finetune.batches import TrainingBatches, train_transform
from finetune.lora_layers import (
    LoraSpec,
    apply_lora,
    lora_parameters,
    paper_checkpoint,
)

TRAIN_LOGIT_SCALE = 100.0  # the paper's code: 100 × cosine similarity, not the model's own scale
ITERATIONS_PER_SHOT = 500
STATE_FORMAT = "cliplora-finetune-state/1"
EVAL_BATCH = 64


@dataclass(frozen=True)
class FinetuneOptions:
    """Everything `cliplora finetune` takes; defaults are the paper's."""

    model: str
    pretrained: str | None
    data: Path
    shots: int
    output: Path
    eval_data: Path | None = None
    seed: int = 1
    lora: LoraSpec = field(default_factory=LoraSpec)
    lr: float = 2e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    min_lr: float = 1e-6
    iterations: int | None = None  # None: 500 × shots
    batch_size: int = 32
    templates: tuple[str, ...] = ()
    device: str = "auto"
    allow_random_weights: bool = False
    resume: bool = False
    save_every: int = 100

    def __post_init__(self) -> None:
        if self.iterations is not None and self.iterations < 1:
            raise InvalidArgument(f"--iterations must be at least 1, got {self.iterations}")
        if self.batch_size < 1:
            raise InvalidArgument(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.min_lr < 0 or self.weight_decay < 0:
            raise InvalidArgument("--lr must be positive; --min-lr and --weight-decay not negative")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidArgument(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.save_every < 1:
            raise InvalidArgument(f"--save-every must be at least 1, got {self.save_every}")

    @property
    def total_iterations(self) -> int:
        return self.iterations if self.iterations is not None else ITERATIONS_PER_SHOT * self.shots

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        record = json.loads(json.dumps(asdict(self), default=str))
        for key in ("output", "resume", "save_every", "device"):
            record.pop(key)
        record["iterations"] = self.total_iterations
        return record


@dataclass(frozen=True)
class FinetuneResult:
    output: Path
    checkpoint: Path | None  # None when the run was stopped before the end
    steps_done: int
    run: dict[str, Any]


def _device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("--device cuda, but PyTorch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _save_json(path: Path, record: dict[str, Any]) -> None:
    _write_atomically(path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8"))


def _save_torch(path: Path, obj: Any) -> None:
    _write_atomically(path, lambda p: torch.save(obj, p))


@torch.no_grad()
def torch_accuracy(
    model: nn.Module, base: BaseModel, tokens: torch.Tensor, data: LabelledImages, device: torch.device
) -> dict[str, Any]:
    """Top-1 of the (adapted) PyTorch model, with exactly the exported graph's computation.

    Images go through `cliplora.preprocess` to the uint8 crop and then through the
    same `ClassifierGraph` the exporter writes to ONNX, so the figure is comparable with
    `cliplora evaluate` of the published model.
    """
    model.eval()
    text = class_embeddings(model, tokens.to(device), len(data.classes)).t()
    graph = ClassifierGraph(model.visual, text, base.logit_scale, base.mean, base.std).to(device)
    predicted: list[int] = []
    paths = [item.path for item in data.items]
    for start in range(0, len(paths), EVAL_BATCH):
        crops = np.stack([preprocess_file(p, base.image_size) for p in paths[start : start + EVAL_BATCH]])
        logits = graph(torch.from_numpy(crops).to(device))
        predicted.extend(int(i) for i in logits.argmax(dim=1).cpu())
    return accuracy_report(data.indices(), predicted, data.classes)


def _prepare_output(options: FinetuneOptions) -> None:
    state = options.output / "state.pt"
    if options.resume:
        if not state.exists():
            raise NotFound(f"--resume: no training state in {options.output} (state.pt)")
        return
    if options.output.exists() and any(options.output.iterdir()):
        raise FailedPrecondition(
            f"{options.output} is not empty: pass --resume to continue the run saved there, "
            "or choose another --output (nothing was overwritten)"
        )
    options.output.mkdir(parents=True, exist_ok=True)


def _load_state(options: FinetuneOptions, train: LabelledImages) -> dict[str, Any]:
    state = torch.load(options.output / "state.pt", map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise FailedPrecondition(f"{options.output / 'state.pt'} is not a cliplora training state")
    before, now = state["fingerprint"], options.fingerprint()
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise FailedPrecondition(f"--resume with different settings than the saved run: {changed}")
    if state["train"] != [str(item.path) for item in train.items]:
        raise FailedPrecondition("--resume: the few-shot images differ from the saved run's (data changed?)")
    return state


def _text_features(model: nn.Module, tokens: torch.Tensor, n_classes: int, trains_text: bool,
                   fixed: torch.Tensor | None) -> torch.Tensor:
    if trains_text:
        return class_embeddings(model, tokens, n_classes)
    assert fixed is not None
    return fixed


def run_finetune(
    options: FinetuneOptions,
    progress: Progress | None = None,
    should_stop: Callable[[int], bool] = lambda step: False,
) -> FinetuneResult:
    """Train, evaluate and write the outputs; `should_stop(step)` ends early after a step,
    saving the state so that ``--resume`` continues exactly there."""
    progress = progress or Progress(quiet=True)
    started = time.perf_counter()
    templates = validate_templates(options.templates)
    data = read_labelled_images(options.data)
    validate_classes(data.classes, str(options.data))
    train, heldout = few_shot_split(data, options.shots, options.seed)
    if options.eval_data is not None:
        heldout = read_labelled_images(options.eval_data)
        unknown = sorted(set(heldout.classes) - set(data.classes))
        if unknown:
            raise InvalidArgument(f"--eval-data has classes the training data lacks: {unknown[:5]}")
        heldout = LabelledImages(heldout.source, heldout.items, data.classes)
    _prepare_output(options)
    state = _load_state(options, train) if options.resume else None

    device = _device(options.device)
    with progress.step(f"load {options.model}"):
        base = load_base_model(options.model, options.pretrained, allow_random_weights=options.allow_random_weights)
    if base.weights.kind == "random":
        progress.warn("random base weights (--allow-random-weights): for tests and demos only")
    torch.manual_seed(options.seed)  # LoRA initialisation, dropout, augmentation
    model = base.model
    adapted = apply_lora(model, options.lora)
    model.to(device)
    branches = nn.ModuleList([block.attention.branches for block in adapted])
    parameters = lora_parameters(adapted)
    optimizer = torch.optim.AdamW(parameters, lr=options.lr, betas=options.betas, weight_decay=options.weight_decay)
    total = options.total_iterations
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=options.min_lr)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    tokens = prompt_tokens(base.tokenizer, data.classes, templates).to(device)
    batches = TrainingBatches(train, options.batch_size, options.seed, train_transform(base.image_size, base.mean, base.std))
    trains_text, trains_vision = options.lora.adapts("text"), options.lora.adapts("vision")

    train.write_csv(options.output / "train.csv")
    if options.eval_data is None and len(heldout):
        heldout.write_csv(options.output / "heldout.csv")
    if state is not None:
        branches.load_state_dict(state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        batches.load_state(state["batches"])
        torch.set_rng_state(state["rng"])
        step, losses, zero_shot = int(state["step"]), list(state["losses"]), state["zero_shot"]
        progress.info(f"resuming at step {step} of {total}")
    else:
        step, losses = 0, []
        zero_shot = None
        if len(heldout):
            with progress.step(f"zero-shot accuracy on {len(heldout)} held-out images"):
                zero_shot = torch_accuracy(model, base, tokens, heldout, device)
            progress.info(f"zero-shot top-1 {zero_shot['top1']:.4f}")

    def save_state() -> None:
        _save_torch(options.output / "state.pt", {
            "format": STATE_FORMAT, "fingerprint": options.fingerprint(), "step": step,
            "train": [str(item.path) for item in train.items], "lora": branches.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "batches": batches.state(), "rng": torch.get_rng_state(),
            "losses": losses, "zero_shot": zero_shot,
        })

    fixed_text = None
    if not trains_text:
        with torch.no_grad():
            fixed_text = class_embeddings(model.eval(), tokens, len(data.classes))
    loop_start = time.perf_counter()
    stopped = False
    try:
        with progress.bar("finetune", total, step) as update, torch.enable_grad():
            while step < total:
                model.train()
                images, targets = batches.next()
                images, targets = images.to(device, non_blocking=True), targets.to(device)
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    text = _text_features(model, tokens, len(data.classes), trains_text, fixed_text)
                    with torch.set_grad_enabled(trains_vision):
                        image_features = model.encode_image(images)
                    image_features = F.normalize(image_features.float(), dim=-1)
                    loss = F.cross_entropy(TRAIN_LOGIT_SCALE * image_features @ text.float().t(), targets)
                if not torch.isfinite(loss):
                    raise FailedPrecondition(f"the loss became {loss.item()} at step {step + 1}; try a lower --lr")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                losses.append(round(float(loss.item()), 6))
                update(step, f"loss {losses[-1]:.4f}")
                if step % options.save_every == 0 or step == total:
                    save_state()
                if step < total and should_stop(step):
                    save_state()
                    stopped = True
                    break
    finally:
        batches.close()
    training_seconds = time.perf_counter() - loop_start

    run: dict[str, Any] = {
        "cliplora_version": cliplora.__version__,
        "options": options.fingerprint() | {"output": str(options.output), "device": str(device)},
        "base": base.manifest(),
        "data": {"source": data.source, "classes": list(data.classes), "train_images": len(train),
                 "eval_source": heldout.source, "eval_images": len(heldout)},
        "templates": templates,
        "iterations": total,
        "steps_done": step,
        "training_seconds_this_session": round(training_seconds, 3),
        "losses": losses,
        "zero_shot": zero_shot,
    }
    if stopped:
        progress.info(f"stopped after step {step} of {total}; continue with --resume")
        _save_json(options.output / "run.json", run | {"status": "stopped"})
        return FinetuneResult(options.output, None, step, run)

    checkpoint_path = options.output / "lora.pt"
    model.eval()
    _save_torch(checkpoint_path, paper_checkpoint(adapted, options.lora))
    (options.output / "classes.txt").write_text("".join(f"{c}\n" for c in data.classes), encoding="utf-8")
    accuracy = None
    if len(heldout):
        with progress.step(f"accuracy on {len(heldout)} held-out images"):
            accuracy = torch_accuracy(model, base, tokens, heldout, device)
        progress.info(f"top-1 {accuracy['top1']:.4f} (zero-shot {zero_shot['top1']:.4f})" if zero_shot
                      else f"top-1 {accuracy['top1']:.4f}")
    else:
        progress.warn("no held-out images (every image was a shot and no --eval-data): accuracy not measured")
    run |= {
        "status": "done",
        "accuracy": accuracy,
        "checkpoint": {"path": str(checkpoint_path), "sha256": sha256_file(checkpoint_path)},
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "total_seconds_this_session": round(time.perf_counter() - started, 3),
        "export": _export_command(options, templates),
    }
    _save_json(options.output / "run.json", run)
    return FinetuneResult(options.output, checkpoint_path, step, run)


def _export_command(options: FinetuneOptions, templates: list[str]) -> str:
    """The `cliplora export` call that publishes this adapter with the same classes and prompts."""
    parts = ["cliplora export", f"--model {options.model}",
             f"--pretrained {options.pretrained}" if options.pretrained else "--allow-random-weights",
             f"--lora {options.output / 'lora.pt'}", f"--classes {options.output / 'classes.txt'}",
             *(f"--template '{t}'" for t in templates), "--name NAME"]
    return " ".join(parts)
