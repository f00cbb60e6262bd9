"""The TensorRT engine cache of `--target gpu`, keyed to the weights.

ONNX Runtime names cached engines after a hash of the file *name* and of the graph's
tensor names, not of the weights; `stamp_engine_key` makes the weights part of it.
"""

from __future__ import annotations

from pathlib import Path

from cliplora.core import contract
from cliplora.core.errors import FailedPrecondition
from cliplora.core.hashing import sha256_file


def stamp_engine_key(onnx_path: Path, output: str = contract.OUTPUT_NAME) -> str:
    """Make the TensorRT engine-cache key of this ONNX file depend on its weights.

    ONNX Runtime names cached engines after a hash of the file *name* (always
    ``model.onnx``) and of the graph's tensor names, not of the weights: two versions of
    one model, or two adapters on one base, hash alike, and with a shared cache folder
    the second would silently run the first one's engine, weights included. Renaming one
    initializer near `output` (for a classifier the class head, the constant operand of
    the final MatMul, which no optimisation folds away; for a text encoder the text
    projection before the normalisation) to carry a digest of the exported file changes
    the key whenever any weight changes. Returns the new name. Run before verification,
    so what is verified is what is published.
    """
    import onnx

    digest = sha256_file(onnx_path)[:16]
    model = onnx.load(str(onnx_path))
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    old = _nearest_constant(graph, initializers, output)
    if old is None:
        raise FailedPrecondition(f"{onnx_path}: no constant feeds {output!r} to carry the engine-cache key")
    new = f"{old}_{digest}"
    initializers[old].name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for value in graph.input:  # older IR versions list initializers as inputs too
        if value.name == old:
            value.name = new
    onnx.save(model, str(onnx_path))
    return new


def _nearest_constant(graph: object, initializers: dict[str, object], output: str) -> str | None:
    """The first initializer met walking back from the node that produces `output`
    (breadth first, inputs in order)."""
    producers = {name: node for node in graph.node for name in node.output}  # type: ignore[attr-defined]
    frontier, seen = [output], set()
    while frontier:
        name = frontier.pop(0)
        node = producers.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        constants = [i for i in node.input if i in initializers]
        if constants:
            return constants[0]
        frontier.extend(node.input)
    return None
