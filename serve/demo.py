"""Demo models for `make serve`: a base model and a LoRA model on ViT-B-16, same classes.

Exports only when the repository has no model yet. With ``CLIPLORA_DEMO_PRETRAINED``
(a weights file or an open_clip tag; ``CLIPLORA_DEMO_MODEL`` picks the architecture,
default ViT-B-16) the base weights are real; otherwise they are deterministic random
weights, and the output and both manifests say so. The adapter is always a seeded,
synthetic paper-format checkpoint (both encoders, q/k/v, all blocks, r = 2, alpha = 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from cliplora.progress import Progress
from cliplora.repository import ModelRepository
from export.base_model import resolve_model_config
from export.lora_paper import block_indices
from export.pipeline import ExportOptions, run_export
from export.publish import render_labels

CLASSES = ["abyssinian", "bengal", "birman", "bombay", "british_shorthair", "egyptian_mau", "maine_coon",
           "persian", "ragdoll", "russian_blue"]
TEMPLATE = "a photo of a {}, a type of pet."
BASE_NAME = "pets-base"
LORA_NAME = "pets-lora"
SEED = 2024


def synthetic_adapter(model: str, path: Path, seed: int = SEED) -> Path:
    """A paper-format checkpoint with small seeded updates (stands in for a trained one)."""
    _, config = resolve_model_config(model)
    towers = [("text", config["text_cfg"]["width"], config["text_cfg"]["layers"]),
              ("vision", config["vision_cfg"]["width"], config["vision_cfg"]["layers"])]
    generator = torch.Generator().manual_seed(seed)
    weights, index = {}, 0
    for _tower, width, layers in towers:
        for _block in block_indices("all", layers):
            weights[f"layer_{index}"] = {
                name: {"w_lora_A": torch.randn(2, width, generator=generator) * 0.02,
                       "w_lora_B": torch.randn(width, 2, generator=generator) * 0.02}
                for name in ("q_proj", "k_proj", "v_proj")
            }
            index += 1
    metadata = {"r": 2, "alpha": 1, "encoder": "both", "params": ["q", "k", "v"], "position": "all"}
    torch.save({"weights": weights, "metadata": metadata}, path)
    return path


def demo_model() -> str:
    return os.environ.get("CLIPLORA_DEMO_MODEL", "ViT-B-16")


def write_inputs(folder: Path, model: str) -> tuple[Path, Path]:
    """The demo's export inputs in `folder`: (classes.txt, lora_demo.pt)."""
    classes = folder / "classes.txt"
    classes.write_text(render_labels(CLASSES), encoding="utf-8")
    return classes, synthetic_adapter(model, folder / "lora_demo.pt")


def export_demo_models(repository: Path) -> bool:
    """Export both demo models unless the repository already has models; True if exported."""
    existing = ModelRepository(repository).model_names()
    if existing:
        print(f"model repository {repository} already has models ({', '.join(existing)}); not exporting demo models",
              file=sys.stderr)
        return False
    model = demo_model()
    pretrained = os.environ.get("CLIPLORA_DEMO_PRETRAINED") or None
    progress = Progress()
    if pretrained is None:
        progress.warn("CLIPLORA_DEMO_PRETRAINED is not set: the demo models get deterministic RANDOM weights. "
                      "They serve and can be load-tested, but classify nothing meaningfully.")
    with tempfile.TemporaryDirectory(prefix="cliplora-demo-") as work:
        classes, adapter = write_inputs(Path(work), model)
        for name, lora in ((BASE_NAME, "none"), (LORA_NAME, str(adapter))):
            progress.info(f"exporting demo model {name} ...")
            run_export(ExportOptions(model=model, pretrained=pretrained, lora=lora, classes=classes,
                                     templates=(TEMPLATE,), name=name, repository=repository,
                                     allow_random_weights=pretrained is None), progress)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--write-inputs", metavar="FOLDER",
                        help="only write the demo adapter (lora_demo.pt) and classes.txt into FOLDER")
    args = parser.parse_args(argv)
    from cliplora.errors import CliploraError

    if args.write_inputs:
        folder = Path(args.write_inputs)
        folder.mkdir(parents=True, exist_ok=True)
        write_inputs(folder, demo_model())
        return 0

    try:
        export_demo_models(Path(args.repository))
    except CliploraError as exc:
        print(f"demo export: {exc.code}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
