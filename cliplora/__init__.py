"""cliplora: few-shot CLIP-LoRA adapters as zero-overhead production classifiers.

One namespace, in layers whose imports run one way (docs/architecture.md):

- `cliplora.cli`, `cliplora.demo`: the command line and the demo models, on top;
- the stages, side by side: `cliplora.export`, `cliplora.finetune`, `cliplora.serve`,
  `cliplora.loadtest`, `cliplora.predict`, `cliplora.evaluate`;
- `cliplora.model`: base model, adapters, merge, reference, head, graph;
- `cliplora.core`: contract, errors, preprocessing, repository, runtime, records;
- `cliplora.v1`: the generated gRPC stubs.
"""

__version__ = "0.1.0"
