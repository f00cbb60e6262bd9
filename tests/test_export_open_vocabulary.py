"""`export --open-vocabulary`, the export's side: the fixed-label graph stays the plain
export's graph (one more output, nothing more computed), and a tokenizer that disagrees
with open_clip or a wrong text graph stops the export with nothing published.

No Triton here: the served side is tests/test_open_vocabulary.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch

from cliplora.core import contract
from cliplora.core.errors import FailedPrecondition
from cliplora.core.tokenizer import ClipTokenizer
from cliplora.export import open_vocabulary, text_encoder
from cliplora.export.open_vocabulary import EmbeddingComparison, TextVerification
from cliplora.export.pipeline import ExportOptions, run_export
from tests import factories
from tests.factories import tree_snapshot
from tests.test_zero_overhead import differing_initializers, structural_differences

MARKED = "brûlée"  # in one of open_vocabulary.PROBE_STRINGS: the string a planted tokenizer gets wrong


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_config) -> dict:
    root = tmp_path_factory.mktemp("export-open-vocabulary")
    return {
        "model": str(tiny_config),
        "classes": factories.write_classes(root / "classes.txt"),
        # both towers adapted: the text encoder of the export differs from the base one
        "lora": str(factories.write_paper_checkpoint(root / "lora.pt", encoder="both", position="all",
                                                     params=("q", "v"))),
    }


def _options(inputs: dict, repository: Path, **overrides) -> ExportOptions:
    settings = dict(model=inputs["model"], pretrained=None, lora=inputs["lora"], classes=inputs["classes"],
                    templates=("a photo of a {}.",), name="ov", repository=repository, allow_random_weights=True,
                    probes=2, open_vocabulary=True)
    settings.update(overrides)
    return ExportOptions(**settings)


@pytest.fixture(scope="module")
def exported(inputs, tmp_path_factory) -> dict:
    repository = tmp_path_factory.mktemp("ov-graphs") / "repo"
    plain = run_export(_options(inputs, repository, name="plain", open_vocabulary=False))
    ov = run_export(_options(inputs, repository))
    return {"plain": plain, "ov": ov, "repository": repository}


def _load(result) -> onnx.ModelProto:
    return onnx.load(str(result.path / contract.MODEL_FILENAME))


def _head(model: onnx.ModelProto) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if contract.OUTPUT_NAME in n.output]
    return node


def _without_image_embeds(model: onnx.ModelProto, features: str) -> onnx.ModelProto:
    """`model` with its ``image_embeds`` output dropped and that tensor called `features` again."""
    stripped = copy.deepcopy(model)
    kept = [o for o in stripped.graph.output if o.name != contract.EMBEDS_NAME]
    del stripped.graph.output[:]
    stripped.graph.output.extend(kept)
    for node in stripped.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == contract.EMBEDS_NAME:
                    names[i] = features
    return stripped


@pytest.mark.slow
def test_open_vocabulary_keeps_the_fixed_label_graph(exported) -> None:
    """The classifier of an --open-vocabulary export is the plain export's graph with the
    features the head multiplies kept as a second output: same nodes, wiring, attributes and
    bit-equal initializers once that output is taken away. Without taking it away the two
    graphs differ, so the comparison is not trivially satisfied."""
    plain, ov = _load(exported["plain"]), _load(exported["ov"])
    assert [o.name for o in ov.graph.output] == [contract.OUTPUT_NAME, contract.EMBEDS_NAME]
    assert _head(ov).input[0] == contract.EMBEDS_NAME  # image_embeds is what the fixed head multiplies
    assert "graph outputs differ" in structural_differences(ov, plain)
    stripped = _without_image_embeds(ov, features=_head(plain).input[0])
    assert structural_differences(stripped, plain) == []
    assert differing_initializers(stripped, plain) == []
    assert exported["ov"].manifest.open_vocabulary.verification.tokenizer_matches  # measured, and it matched


def _disagreeing_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plant: the gateway's tokenizer gives one other id for the probe string with `MARKED`."""
    real = ClipTokenizer.__call__

    def disagreeing(self, texts, context_length=contract.CONTEXT_LENGTH):
        ids = real(self, texts, context_length)
        for row, text in enumerate([texts] if isinstance(texts, str) else list(texts)):
            if MARKED in text:
                ids[row, 1] += 1
        return ids

    monkeypatch.setattr(ClipTokenizer, "__call__", disagreeing)


def _fails_cleanly(options: ExportOptions, message: str) -> None:
    before = tree_snapshot(options.repository)
    with pytest.raises(FailedPrecondition, match=message):
        run_export(options)
    after = tree_snapshot(options.repository)
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")}


@pytest.mark.slow
def test_a_tokenizer_that_disagrees_stops_the_export_first(inputs, tmp_path, monkeypatch) -> None:
    """Refused before the adapter is even read (its path does not exist: reading it would be
    NOT_FOUND), naming the string, with the repository untouched."""
    repository = tmp_path / "repo"
    run_export(_options(inputs, repository, name="kept", open_vocabulary=False))
    _disagreeing_tokenizer(monkeypatch)
    _fails_cleanly(_options(inputs, repository, lora=str(tmp_path / "missing.pt")),
                   rf"the gateway's tokenizer disagrees with open_clip on 1 strings, e\.g\. '.*{MARKED}.*'; "
                   "nothing published")


@pytest.mark.slow
def test_the_text_verification_measures_the_tokenizer(inputs, tmp_path, monkeypatch) -> None:
    """With the early check out of the way, the verification itself compares the ids the ONNX
    text encoder got (ours) with open_clip's, and refuses: the manifest's tokenizer_matches is
    a measurement, not a constant."""
    repository = tmp_path / "repo"
    run_export(_options(inputs, repository, name="kept", open_vocabulary=False))
    _disagreeing_tokenizer(monkeypatch)
    monkeypatch.setattr(open_vocabulary, "check_tokenizer", lambda open_clip_tokenizer, strings: ClipTokenizer())
    _fails_cleanly(_options(inputs, repository),
                   "text encoder verification failed, nothing published: .*the gateway's tokenizer gives other "
                   "token ids than open_clip's")


@pytest.mark.slow
def test_a_wrong_text_graph_is_refused(inputs, tmp_path, monkeypatch) -> None:
    """Plant: the exported text encoder is the merged one with one attention weight nudged;
    the ONNX text embeddings then miss the unmerged reference's, and nothing is published."""
    repository = tmp_path / "repo"
    run_export(_options(inputs, repository, name="kept", open_vocabulary=False))
    real = text_encoder.TextGraph

    def nudged(model: torch.nn.Module, precision: str) -> torch.nn.Module:
        wrong = copy.deepcopy(model)
        weight = wrong.transformer.resblocks[0].attn.out_proj.weight
        with torch.no_grad():  # noise, not a constant: the next LayerNorm would take a constant away
            weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        return real(wrong, precision)

    monkeypatch.setattr(text_encoder, "TextGraph", nudged)
    _fails_cleanly(_options(inputs, repository),
                   "text encoder verification failed, nothing published: ONNX text embeddings differ from the "
                   "unmerged reference's")


def test_the_tokenizer_rule_of_the_text_verification() -> None:
    """Everything else within bounds: a tokenizer mismatch alone fails the verification."""
    close = EmbeddingComparison(max_logit_error=1e-5, max_abs=1e-6, min_cosine=1.0)

    def check(tokenizer_matches: bool) -> TextVerification:
        return TextVerification(precision="fp32", tolerance=1e-3, strings=3, text_vs_reference=close,
                                merged_torch_vs_reference=close, text_vs_base=None, image_embeds_vs_reference=close,
                                image_label_logit_error=1e-5, image_tolerance=1e-3, int8=False,
                                tokenizer_matches=tokenizer_matches)

    assert check(True).failures == [] and check(True).record().passed
    assert check(False).failures == ["the gateway's tokenizer gives other token ids than open_clip's for the "
                                     "verified strings"]
    assert not check(False).record().passed and not check(False).record().tokenizer_matches
