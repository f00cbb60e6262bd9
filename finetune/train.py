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

import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cliplora
from cliplora.core.accuracy import accuracy_report, top1_in_batches
from cliplora.core.atomic import write_atomically, write_text_atomically
from cliplora.core.datasets import LabelledImages, few_shot_split, read_labelled_images
from cliplora.core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from cliplora.core.hashing import sha256_file
from cliplora.core.preprocess import Decoding, preprocess_file
from cliplora.core.progress import Progress
from cliplora.core.repository import render_labels
from cliplora.core.run_record import DataRecord, RunRecord
from cliplora.finetune.batches import TrainingBatches, train_transform
from cliplora.finetune.lora_layers import (
    AdaptedBlock,
    apply_lora,
    lora_parameters,
    paper_checkpoint,
)
from cliplora.finetune.options import FinetuneOptions
from cliplora.model.base_model import BaseModel, load_base_model
from cliplora.model.graph import ClassifierGraph
from cliplora.model.head import (
    class_embeddings,
    prompt_tokens,
    validate_classes,
    validate_templates,
)

TRAIN_LOGIT_SCALE = 100.0  # the paper's code: 100 × cosine similarity, not the model's own scale
STATE_FORMAT = "cliplora-finetune-state/1"
EVAL_BATCH = 64


@dataclass(frozen=True)
class FinetuneResult:
    output: Path
    checkpoint: Path | None  # None when the run was stopped before the end
    steps_done: int
    run: RunRecord


def _device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("--device cuda, but PyTorch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _save_record(path: Path, record: RunRecord) -> None:
    write_text_atomically(path, record.to_json())


def _save_torch(path: Path, obj: Any) -> None:
    write_atomically(path, lambda temporary: torch.save(obj, temporary))


@torch.no_grad()
def torch_accuracy(
    model: nn.Module, base: BaseModel, tokens: torch.Tensor, data: LabelledImages, device: torch.device,
    decoding: Decoding = Decoding(),
) -> dict[str, Any]:
    """Top-1 of the (adapted) PyTorch model, with exactly the exported graph's computation.

    Images go through `cliplora.core.preprocess` to the uint8 crop and then through the
    same `ClassifierGraph` the exporter writes to ONNX, so the figure is comparable with
    `cliplora evaluate` of the published model.
    """
    model.eval()
    text = class_embeddings(model, tokens.to(device), len(data.classes)).t()
    graph = ClassifierGraph(model.visual, text, base.logit_scale, base.mean, base.std).to(device)

    def top1(paths: Sequence[Path]) -> list[int]:
        crops = np.stack([preprocess_file(p, base.image_size, decoding=decoding) for p in paths])
        return [int(i) for i in graph(torch.from_numpy(crops).to(device)).argmax(dim=1).cpu()]

    predicted = top1_in_batches([item.path for item in data.items], top1, EVAL_BATCH)
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
    path = options.output / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or tampered files fail in many ways
        raise FailedPrecondition(f"{path} cannot be read as a training state ({type(exc).__name__}: {exc})") from None
    keys = {"format", "fingerprint", "step", "train", "lora", "optimizer", "scheduler", "scaler", "batches", "rng",
            "losses", "zero_shot"}
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not keys <= set(state):
        raise FailedPrecondition(f"{path} is not a cliplora training state ({STATE_FORMAT})")
    before, now = state["fingerprint"], options.fingerprint()
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise FailedPrecondition(f"--resume with different settings than the saved run: {changed}")
    if state["train"] != [str(item.path) for item in train.items]:
        raise FailedPrecondition("--resume: the few-shot images differ from the saved run's (data changed?)")
    return state


@dataclass
class _Run:
    """Everything a training run holds; `state()` / `restore()` make it resumable."""

    options: FinetuneOptions
    data: LabelledImages
    train: LabelledImages
    heldout: LabelledImages
    templates: list[str]
    base: BaseModel
    adapted: list[AdaptedBlock]
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    batches: TrainingBatches
    tokens: torch.Tensor
    step: int = 0
    losses: list[float] = field(default_factory=list)
    zero_shot: dict[str, Any] | None = None

    @property
    def model(self) -> nn.Module:
        return self.base.model

    @property
    def branches(self) -> nn.ModuleList:
        return nn.ModuleList([block.attention.branches for block in self.adapted])

    def state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "fingerprint": self.options.fingerprint(), "step": self.step,
            "train": [str(item.path) for item in self.train.items], "lora": self.branches.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "batches": self.batches.state(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "losses": self.losses, "zero_shot": self.zero_shot,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.branches.load_state_dict(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state(state["batches"])
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.losses, self.zero_shot = int(state["step"]), list(state["losses"]), state["zero_shot"]

    def save(self) -> None:
        _save_torch(self.options.output / "state.pt", self.state())


def _split(options: FinetuneOptions) -> tuple[LabelledImages, LabelledImages, LabelledImages]:
    """(all data, the shots, the held-out set) as the options say."""
    data = read_labelled_images(options.data)
    validate_classes(data.classes, str(options.data))
    train, heldout = few_shot_split(data, options.shots, options.seed)
    if options.eval_data is not None:
        heldout = read_labelled_images(options.eval_data)
        unknown = sorted(set(heldout.classes) - set(data.classes))
        if unknown:
            raise InvalidArgument(f"--eval-data has classes the training data lacks: {unknown[:5]}")
        heldout = data.subset(heldout.items, heldout.source)
    return data, train, heldout


def _start(options: FinetuneOptions, progress: Progress) -> _Run:
    """Data, model, adapter, optimiser: a fresh run at step 0 (saved) or the saved one."""
    templates = validate_templates(options.templates)
    data, train, heldout = _split(options)
    _prepare_output(options)
    state = _load_state(options, train) if options.resume else None
    device = _device(options.device)
    with progress.step(f"load {options.model}"):
        base = load_base_model(options.model, options.pretrained, allow_random_weights=options.allow_random_weights)
    if base.weights.kind == "random":
        progress.warn("random base weights (--allow-random-weights): for tests and demos only")
    torch.manual_seed(options.seed)  # LoRA initialisation, dropout, augmentation
    adapted = apply_lora(base.model, options.lora)
    base.model.to(device)
    optimizer = torch.optim.AdamW(lora_parameters(adapted), lr=options.lr, betas=options.betas,
                                  weight_decay=options.weight_decay)
    run = _Run(
        options, data, train, heldout, templates, base, adapted, device, optimizer,
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, options.total_iterations, eta_min=options.min_lr),
        torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),
        TrainingBatches(train, options.batch_size, options.seed, train_transform(base.image_size, base.mean, base.std),
                        options.exif_orientation),
        prompt_tokens(base.tokenizer, data.classes, templates).to(device),
    )
    with progress.step(f"checking {len(train)} training images"):
        run.batches.check_images()
    if state is not None:
        run.restore(state)
        progress.info(f"resuming at step {run.step} of {options.total_iterations}")
        return run
    train.write_csv(options.output / "train.csv")
    if options.eval_data is None and len(heldout):
        heldout.write_csv(options.output / "heldout.csv")
    missing = sorted(set(data.classes) - {item.label for item in heldout.items})
    if len(heldout) and missing:
        progress.warn(f"no held-out images for {missing[:5]}: the accuracy leaves them out")
    if len(heldout):
        with progress.step(f"zero-shot accuracy on {len(heldout)} held-out images"):
            run.zero_shot = torch_accuracy(run.model, base, run.tokens, heldout, device,
                                           Decoding(orientation=options.exif_orientation))
        progress.info(f"zero-shot top-1 {run.zero_shot['top1']:.4f}")
    run.save()  # from here on, --resume works whatever happens
    return run


def _train(run: _Run, progress: Progress, should_stop: Callable[[int], bool]) -> bool:
    """Steps until the end (True) or until `should_stop` (False); saves the state on the way."""
    options, model, total = run.options, run.model, run.options.total_iterations
    trains_text, trains_vision = options.lora.adapts("text"), options.lora.adapts("vision")
    n_classes, amp = len(run.data.classes), run.device.type == "cuda"
    fixed_text = None
    if not trains_text:
        with torch.no_grad():
            fixed_text = class_embeddings(model.eval(), run.tokens, n_classes)
    with progress.bar("finetune", total, run.step) as update, torch.enable_grad():
        model.train()
        while run.step < total:
            images, targets = run.batches.next()
            images, targets = images.to(run.device, non_blocking=True), targets.to(run.device)
            try:
                with torch.autocast(run.device.type, dtype=torch.float16, enabled=amp):
                    text = class_embeddings(model, run.tokens, n_classes) if trains_text else fixed_text
                    with torch.set_grad_enabled(trains_vision):
                        image_features = model.encode_image(images)
                    image_features = F.normalize(image_features.float(), dim=-1)
                    loss = F.cross_entropy(TRAIN_LOGIT_SCALE * image_features @ text.float().t(), targets)
                if not torch.isfinite(loss):
                    raise FailedPrecondition(
                        f"the loss became {loss.item()} at step {run.step + 1}; start again with a lower --lr "
                        f"in a new --output (--resume continues from the last saved step, same settings)")
                run.optimizer.zero_grad(set_to_none=True)
                run.scaler.scale(loss).backward()
            except torch.OutOfMemoryError:
                raise ResourceExhausted(
                    f"out of {run.device.type} memory at batch size {len(images)}: lower --batch-size "
                    "(in a new --output; --resume keeps the settings)") from None
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.scheduler.step()
            run.step += 1
            run.losses.append(round(float(loss.item()), 6))
            update(run.step, f"loss {run.losses[-1]:.4f}")
            if run.step % options.save_every == 0 or run.step == total:
                run.save()
            if run.step < total and should_stop(run.step):
                run.save()
                return False
    return True


def run_finetune(
    options: FinetuneOptions,
    progress: Progress | None = None,
    should_stop: Callable[[int], bool] = lambda step: False,
) -> FinetuneResult:
    """Train, evaluate and write the outputs; `should_stop(step)` ends early after a step,
    saving the state so that ``--resume`` continues exactly there."""
    progress = progress or Progress(quiet=True)
    started = time.perf_counter()
    run = _start(options, progress)
    loop_start = time.perf_counter()
    try:
        finished = _train(run, progress, should_stop)
    finally:
        run.batches.close()
    record = RunRecord(
        schema_version=RunRecord.schema_versions[-1],
        cliplora_version=cliplora.__version__,
        options=options.fingerprint() | {"output": str(options.output), "device": str(run.device)},
        base=run.base.record(),
        data=DataRecord(source=run.data.source, classes=list(run.data.classes), train_images=len(run.train),
                        eval_source=run.heldout.source, eval_images=len(run.heldout)),
        templates=run.templates,
        iterations=options.total_iterations,
        steps_done=run.step,
        training_seconds_this_session=round(time.perf_counter() - loop_start, 3),
        losses=run.losses,
        zero_shot=run.zero_shot,
        status="done" if finished else "stopped",
    )
    if not finished:
        progress.info(f"stopped after step {run.step} of {options.total_iterations}; continue with --resume")
        _save_record(options.output / "run.json", record)
        return FinetuneResult(options.output, None, run.step, record)
    return _finish(run, record, progress, started)


def _finish(run: _Run, record: RunRecord, progress: Progress, started: float) -> FinetuneResult:
    """The checkpoint, the class list, the final accuracy and run.json."""
    options = run.options
    checkpoint_path = options.output / "lora.pt"
    run.model.eval()
    _save_torch(checkpoint_path, paper_checkpoint(run.adapted, options.lora))
    write_text_atomically(options.output / "classes.txt", render_labels(list(run.data.classes)))
    accuracy = None
    if len(run.heldout):
        with progress.step(f"accuracy on {len(run.heldout)} held-out images"):
            accuracy = torch_accuracy(run.model, run.base, run.tokens, run.heldout, run.device,
                                      Decoding(orientation=run.options.exif_orientation))
        zero_shot = f" (zero-shot {run.zero_shot['top1']:.4f})" if run.zero_shot else ""
        progress.info(f"top-1 {accuracy['top1']:.4f}{zero_shot}")
    else:
        progress.warn("no held-out images (every image was a shot and no --eval-data): accuracy not measured")
    record = RunRecord.from_dict(record.to_dict() | {
        "accuracy": accuracy,
        "checkpoint": {"path": str(checkpoint_path), "sha256": sha256_file(checkpoint_path)},
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "total_seconds_this_session": round(time.perf_counter() - started, 3),
        "export": _export_command(options, run.templates),
    }, "run.json")
    _save_record(options.output / "run.json", record)
    return FinetuneResult(options.output, checkpoint_path, run.step, record)


def _export_command(options: FinetuneOptions, templates: list[str]) -> str:
    """The `cliplora export` call that publishes this adapter with the same classes and prompts."""
    words = ["cliplora", "export", "--model", options.model,
             *(["--pretrained", options.pretrained] if options.pretrained else ["--allow-random-weights"]),
             "--lora", str(options.output / "lora.pt"), "--classes", str(options.output / "classes.txt"),
             *(w for t in templates for w in ("--template", t)), "--name", "NAME"]
    return shlex.join(words)
