"""Training batches: shuffled epochs over the few-shot images, augmented as in the paper.

Augmentation is the CLIP-LoRA training transform: ``RandomResizedCrop(size, scale=(0.08,
1), bicubic)``, ``RandomHorizontalFlip()``, then CLIP's mean/std normalisation. Images
are decoded on a thread pool (deterministic: decoding draws no random numbers); every
random draw (order, crops, flips) happens on the main thread, so a seed fixes the run
and a saved state resumes it exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from cliplora.core.datasets import LabelledImages
from cliplora.core.preprocess import read_image_file

CROP_SCALE = (0.08, 1.0)


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=CROP_SCALE, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.ToTensor(),
        transforms.Normalize(mean=list(mean), std=list(std)),
    ])


def _read_rgb(path: Path, orientation: str) -> Image.Image:
    return read_image_file(path, orientation=orientation).convert("RGB")


class TrainingBatches:
    """Batches of `batch_size`, epoch after epoch, each epoch ending with its short
    remainder batch (``drop_last=False``, as the paper's loader); every batch is a step.

    An epoch is a permutation of the images drawn from a generator seeded with `seed`.
    """

    def __init__(self, data: LabelledImages, batch_size: int, seed: int, transform: transforms.Compose,
                 orientation: str = "apply") -> None:
        self.paths = [item.path for item in data.items]
        self.targets = torch.tensor(data.indices(), dtype=torch.long)
        self.batch_size = min(batch_size, len(self.paths))
        self.transform = transform
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.cursor = 0
        self.orientation = orientation  # EXIF orientation: apply (upright) or ignore (`cliplora.core.preprocess`)
        self.pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="decode")

    def _next_indices(self) -> list[int]:
        if self.cursor >= len(self.order):
            self.order = torch.randperm(len(self.paths), generator=self.generator).tolist()
            self.cursor = 0
        indices = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return indices

    def check_images(self) -> None:
        """Decode every image once, before training: a bad file stops the run at once,
        named, instead of at some later step."""
        list(self.pool.map(_read_rgb, self.paths, [self.orientation] * len(self.paths)))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [B, 3, S, S] float, targets [B])."""
        indices = self._next_indices()
        images = list(self.pool.map(_read_rgb, [self.paths[i] for i in indices], [self.orientation] * len(indices)))
        return torch.stack([self.transform(image) for image in images]), self.targets[indices]

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": list(self.order), "cursor": self.cursor}

    def load_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])
        self.cursor = int(state["cursor"])

    def close(self) -> None:
        self.pool.shutdown(wait=True)
