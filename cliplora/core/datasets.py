"""Labelled images on disk, for `cliplora finetune` and `cliplora evaluate`.

Two layouts are read:

- an image folder with one sub-folder per class (``root/<class>/<image>``), the class
  being the sub-folder's name; files that are not images by extension are skipped;
- a CSV file of ``path,label`` rows (a ``path,label`` header is optional); relative
  paths are taken from the CSV's own folder.

Classes are sorted by name, so the same data always gives the same class order (and
the same ``classes.txt`` for the export). Few-shot sampling draws N images per class
with a seeded generator; everything not drawn is the held-out split.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cliplora.core.errors import InvalidArgument, NotFound

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str


@dataclass(frozen=True)
class LabelledImages:
    """Images with class names, and the sorted class list they use."""

    source: str
    items: tuple[LabelledImage, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.items)

    def indices(self) -> list[int]:
        """The class index of every item, in `classes` order."""
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[item.label] for item in self.items]

    def per_class(self) -> dict[str, list[LabelledImage]]:
        groups: dict[str, list[LabelledImage]] = defaultdict(list)
        for item in self.items:
            groups[item.label].append(item)
        return groups

    def subset(self, items: Sequence[LabelledImage], source: str) -> LabelledImages:
        """Some of these items, keeping the class list (a split must not renumber classes)."""
        return LabelledImages(source, tuple(items), self.classes)

    def write_csv(self, path: Path) -> None:
        """``path,label`` rows with absolute paths; `read_labelled_images` reads them back."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            for item in self.items:
                writer.writerow([str(item.path.resolve()), item.label])


def read_labelled_images(source: str | Path) -> LabelledImages:
    """An image folder (one sub-folder per class) or a ``path,label`` CSV file."""
    path = Path(source)
    if not path.exists():
        raise NotFound(f"data not found: {path} (an image folder with one sub-folder per class, or a CSV)")
    items = _read_folder(path) if path.is_dir() else _read_csv(path)
    if not items:
        raise InvalidArgument(f"{path}: no labelled images found")
    classes = tuple(sorted({item.label for item in items}))
    return LabelledImages(str(path), tuple(items), classes)


def _read_folder(root: Path) -> list[LabelledImage]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise InvalidArgument(f"{root}: expected one sub-folder per class, found none")
    items = []
    for folder in class_dirs:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InvalidArgument(f"{root}: class folder {folder.name!r} holds no images")
        items.extend(LabelledImage(f, folder.name) for f in files)
    return items


def _read_csv(path: Path) -> list[LabelledImage]:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, PermissionError) as exc:
        raise InvalidArgument(f"cannot read CSV {path}: {exc}") from None
    rows = list(csv.reader(text.splitlines()))
    if rows and [c.strip().lower() for c in rows[0]] == ["path", "label"]:
        rows = rows[1:]
    items = []
    for number, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise InvalidArgument(f"{path} row {number}: expected 'path,label', got {row!r}")
        image = Path(row[0].strip())
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise NotFound(f"{path} row {number}: image not found: {image}")
        items.append(LabelledImage(image, row[1].strip()))
    return items


def few_shot_split(data: LabelledImages, shots: int, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """(N images per class drawn with `seed`, everything else) from `data`.

    Every class needs at least `shots` images (a class with fewer is named in the error);
    a class with exactly `shots` has none left for the held-out split.
    """
    if shots < 1:
        raise InvalidArgument(f"--shots must be at least 1, got {shots}")
    rng = random.Random(seed)
    train: list[LabelledImage] = []
    rest: list[LabelledImage] = []
    groups = data.per_class()
    short = {c: len(groups[c]) for c in data.classes if len(groups[c]) < shots}
    if short:
        raise InvalidArgument(f"{data.source}: {shots} shots need {shots} images per class; too few in {short}")
    for label in data.classes:
        members = list(groups[label])
        rng.shuffle(members)
        train.extend(members[:shots])
        rest.extend(members[shots:])
    return data.subset(train, f"{data.source} ({shots} shots, seed {seed})"), data.subset(rest, f"{data.source} (held out)")


def align_classes(data: LabelledImages, classes: Sequence[str]) -> list[int]:
    """Class indices of `data`'s items in a model's `classes`; unknown labels are an error."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({item.label for item in data.items} - index.keys())
    if unknown:
        raise InvalidArgument(
            f"{data.source}: labels {unknown[:5]} are not classes of the model (it has {list(classes)[:5]}...)"
        )
    return [index[item.label] for item in data.items]
