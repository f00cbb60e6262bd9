"""Demo models for `make serve`: a base model and a LoRA model on ViT-B-16, same classes;
the LoRA model is exported with ``--open-vocabulary`` (its text encoder is ``pets-lora_text``).

    python -m cliplora.demo --repository model_repository
    python -m cliplora.demo --write-inputs FOLDER     # only classes.txt and lora_demo.pt

Exports only when the repository has no model yet. With ``CLIPLORA_DEMO_PRETRAINED``
(a weights file or an open_clip tag; ``CLIPLORA_DEMO_MODEL`` picks the architecture,
default ViT-B-16) the base weights are real; otherwise they are deterministic random
weights, and the output and both manifests say so. The inputs (classes, template, the
synthetic adapter) are `cliplora.model.demo`'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from cliplora.core.errors import CliploraError
from cliplora.core.progress import Progress
from cliplora.core.repository import ModelRepository
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.model.demo import BASE_NAME, LORA_NAME, TEMPLATE, demo_model, write_inputs


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
                                     allow_random_weights=pretrained is None,
                                     open_vocabulary=name == LORA_NAME), progress)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--write-inputs", metavar="FOLDER",
                        help="only write the demo adapter (lora_demo.pt) and classes.txt into FOLDER")
    args = parser.parse_args(argv)
    try:
        if args.write_inputs:
            folder = Path(args.write_inputs)
            folder.mkdir(parents=True, exist_ok=True)
            write_inputs(folder, demo_model())
        else:
            export_demo_models(Path(args.repository))
    except CliploraError as exc:
        print(f"demo export: {exc.code}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
