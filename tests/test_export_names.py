"""One rule for the names a model ranks, at export and at request time: two names are alike
when the tokenizer gives their prompt text the same ids (`cliplora.core.open_vocab.check_distinct`
with the gateway's tokenizer), and alike names are refused, naming both."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cliplora.core.errors import InvalidArgument
from cliplora.core.runtime import PublishedTextEncoder
from cliplora.core.tokenizer import get_tokenizer
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.model import head
from tests import factories

ALIKE = [
    ("red_panda", "Red panda"),  # '_' is a space in a prompt; case
    ("red panda", "red   panda"),  # runs of spaces
    ("café", "cafe\u0301"),  # NFC and NFD: ftfy makes them one text
    ("fish & chips", "fish &amp; chips"),  # HTML entities
]
DISTINCT = ["red panda", "red pandas", "panda", "café", "cafe", "golden_retriever", "Labrador", "東京タワー"]


@pytest.mark.parametrize(("first", "second"), ALIKE)
def test_class_names_read_alike_are_refused(first: str, second: str) -> None:
    assert first != second  # different strings: the duplicate check alone lets them through
    with pytest.raises(InvalidArgument) as refused:
        head.validate_classes(["cat", first, "dog", second], "classes.txt")
    message = str(refused.value)
    assert message.startswith("classes file classes.txt: class 3 ")
    assert repr(second) in message and repr(first) in message and "class 1" in message
    assert "the tokenizer gives them the same ids" in message


def test_distinct_class_names_pass() -> None:
    assert head.validate_classes(DISTINCT, "classes.txt") == DISTINCT
    encode = get_tokenizer().encode  # each pair really does differ in ids
    assert len({tuple(encode(name.replace("_", " "))) for name in DISTINCT}) == len(DISTINCT)


def test_export_refuses_alike_class_names_before_loading_anything(tmp_path) -> None:
    classes = factories.write_classes(tmp_path / "classes.txt", ["cat", "café", "cafe\u0301"])
    options = ExportOptions(model=str(tmp_path / "no-such-config.json"), pretrained=None, lora="none",
                            classes=classes, templates=(), name="names", repository=tmp_path / "repo")
    with pytest.raises(InvalidArgument, match=r"class 2 \('cafe\u0301'\) is class 1 \('café'\) again"):
        run_export(options)  # the model named does not exist: the names were refused first
    assert not (tmp_path / "repo" / "names").exists()


def test_finetune_refuses_alike_class_folders(tmp_path, tiny_config) -> None:
    from cliplora.finetune.options import FinetuneOptions
    from cliplora.finetune.train import run_finetune

    for label in ("red_panda", "Red panda"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            factories.make_image(40, 30, seed=i).save(tmp_path / "data" / label / f"{i}.png")
    options = FinetuneOptions(model=str(tiny_config), pretrained=None, data=tmp_path / "data", shots=1,
                              output=tmp_path / "run", allow_random_weights=True, iterations=1)
    with pytest.raises(InvalidArgument, match=r"is class \d \('(red_panda|Red panda)'\) again"):
        run_finetune(options)


class _Session:
    """A text encoder session that embeds every prompt as the same unit vector."""

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        (tokens,) = feeds.values()
        return [np.tile(np.eye(1, 4, dtype=np.float32), (len(tokens), 1))]


def _text_encoder() -> PublishedTextEncoder:
    return PublishedTextEncoder(found=None, session=_Session(), logit_scale=100.0, templates=("a photo of a {}.",),
                                tokenizer=get_tokenizer())


@pytest.mark.parametrize(("first", "second"), ALIKE)
def test_predict_labels_read_alike_are_refused(first: str, second: str) -> None:
    """`cliplora predict --labels` / `evaluate --labels-file` (core/runtime.py): the same rule."""
    with pytest.raises(InvalidArgument, match=rf"label 1 \({re.escape(repr(second))}\) is label 0 \({re.escape(repr(first))}\) again"):
        _text_encoder().label_heads([first, second])


def test_distinct_predict_labels_pass() -> None:
    assert _text_encoder().label_heads(DISTINCT).shape == (len(DISTINCT), 4)
