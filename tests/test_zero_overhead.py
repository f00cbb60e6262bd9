"""The product's main promise, checked on the ONNX files themselves: a merged LoRA export is
the base export's graph with other numbers in it, so serving the adapter costs exactly what
serving the base model costs. Same nodes in the same order, wired the same way; the same
initializers (names, shapes, dtypes); only the values of the adapted weights and of the
folded text head differ. The unmerged export shows the comparison can fail."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cliplora.core import contract
from cliplora.export.pipeline import ExportOptions, run_export
from tests import factories

pytestmark = pytest.mark.slow  # every test exports the tiny model, some twice

Exporter = Callable[..., onnx.ModelProto]

# Distinct vision-tower matrices each adapter changes. The exporter keeps q, k and v in one
# in_proj initializer and out_proj in another, so: paper (q, k, v, o on all 12 blocks) 2 x 12;
# PEFT (the factory's vision 0 q and vision 5 v) the in_proj of blocks 0 and 5.
CHANGED_VISION_MATRICES = {"paper": 24, "peft": 2}


def _attribute(attribute: onnx.AttributeProto) -> object:
    """An attribute's value; a tensor attribute by dtype and shape only, like an initializer."""
    if attribute.type == onnx.AttributeProto.TENSOR:
        return ("tensor", attribute.t.data_type, tuple(attribute.t.dims))
    value = onnx.helper.get_attribute_value(attribute)
    return tuple(value) if isinstance(value, list) else value


def _value_type(value: onnx.ValueInfoProto) -> tuple:
    tensor = value.type.tensor_type
    return value.name, tensor.elem_type, tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)


def structural_differences(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    """Everything that tells graph `a` from graph `b` apart from initializer values; [] when none."""
    problems = []
    if [(o.domain, o.version) for o in a.opset_import] != [(o.domain, o.version) for o in b.opset_import]:
        problems.append("opset imports differ")
    for what in ("input", "output"):
        if [_value_type(v) for v in getattr(a.graph, what)] != [_value_type(v) for v in getattr(b.graph, what)]:
            problems.append(f"graph {what}s differ")
    ops_a, ops_b = Counter(n.op_type for n in a.graph.node), Counter(n.op_type for n in b.graph.node)
    if ops_a != ops_b:
        counts = ", ".join(f"{op} {ops_a[op]} vs {ops_b[op]}" for op in sorted(ops_a | ops_b) if ops_a[op] != ops_b[op])
        problems.append(f"op counts differ: {counts}")
    if len(a.graph.node) != len(b.graph.node):
        problems.append(f"node count {len(a.graph.node)} vs {len(b.graph.node)}")
    for index, (x, y) in enumerate(zip(a.graph.node, b.graph.node, strict=False)):
        if x.op_type != y.op_type:
            problems.append(f"node {index}: op {x.op_type} vs {y.op_type}")
            break
        if (list(x.input), list(x.output)) != (list(y.input), list(y.output)):
            problems.append(f"node {index} ({x.op_type}): wiring {list(x.input)}->{list(x.output)} "
                            f"vs {list(y.input)}->{list(y.output)}")
            break
        if sorted((t.name, _attribute(t)) for t in x.attribute) != sorted((t.name, _attribute(t)) for t in y.attribute):
            problems.append(f"node {index} ({x.op_type}): attributes differ")
            break

    def initializers(model: onnx.ModelProto) -> list[tuple[str, tuple[int, ...], int]]:
        return [(i.name, tuple(i.dims), i.data_type) for i in model.graph.initializer]

    if initializers(a) != initializers(b):
        only = {x[0] for x in initializers(a)} ^ {x[0] for x in initializers(b)}
        problems.append(f"initializers differ (names in one only: {sorted(only)[:5]})")
    return problems


def differing_initializers(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    """Names of the initializers of `a` whose values are not bit-equal to `b`'s of that name."""
    values = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    return [i.name for i in a.graph.initializer if not np.array_equal(numpy_helper.to_array(i), values[i.name])]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Exporter:
    """`export(lora, precision, unmerged=False)`: the ONNX graph, each combination exported once."""
    root = tmp_path_factory.mktemp("zero-overhead")
    classes = factories.write_classes(root / "classes.txt")
    adapters = {
        "none": "none",
        "paper": str(factories.write_paper_checkpoint(root / "lora.pt", encoder="both", params=("q", "k", "v", "o"),
                                                      position="all")),
        "peft": str(factories.write_peft_adapter(root / "peft")),
    }
    graphs: dict[tuple[str, str, bool], onnx.ModelProto] = {}

    def exported(lora: str, precision: str, unmerged: bool = False) -> onnx.ModelProto:
        key = (lora, precision, unmerged)
        if key not in graphs:
            name = f"{lora}-{precision}{'-unmerged' if unmerged else ''}"
            result = run_export(ExportOptions(
                model=str(tiny_config), pretrained=None, lora=adapters[lora], classes=classes,
                templates=("a photo of a {}.",), name=name, repository=root / "repo", precision=precision,
                target="portable", unmerged=unmerged, allow_random_weights=True, probes=2,
            ))
            graphs[key] = onnx.load(str(result.path / contract.MODEL_FILENAME))
        return graphs[key]

    return exported


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("lora", ["paper", "peft"])
def test_merged_export_is_the_base_graph_with_other_weights(export: Exporter, lora: str, precision: str) -> None:
    """Merged vs `--lora none`: no structural difference at all; the head and exactly the adapted
    vision matrices hold other values, every other initializer is bit-equal to the base's."""
    base, merged = export("none", precision), export(lora, precision)
    assert structural_differences(merged, base) == []
    changed = differing_initializers(merged, base)
    assert "head" in changed, "the text encoder is adapted: the folded head must change"
    assert len(changed) - 1 == CHANGED_VISION_MATRICES[lora], changed
    if precision == "fp16":
        dtypes = {i.data_type for i in merged.graph.initializer}
        assert onnx.TensorProto.FLOAT16 in dtypes


def test_the_comparison_tells_an_unmerged_graph_apart(export: Exporter) -> None:
    """The unmerged export of the same adapter has extra MatMul nodes (the LoRA branches): the
    comparison above must report it; and a graph compared with itself has no differing values,
    so the value check above is not satisfied trivially."""
    merged, unmerged = export("paper", "fp32"), export("paper", "fp32", unmerged=True)
    problems = structural_differences(unmerged, merged)
    assert problems, "an unmerged graph passed for the merged one"
    ops_unmerged = Counter(n.op_type for n in unmerged.graph.node)
    ops_merged = Counter(n.op_type for n in merged.graph.node)
    assert ops_unmerged["MatMul"] >= ops_merged["MatMul"] + 12 * 4 * 2
    assert any(p.startswith("op counts differ:") and "MatMul" in p for p in problems), problems
    base = export("none", "fp32")
    assert structural_differences(base, base) == [] and differing_initializers(base, base) == []
