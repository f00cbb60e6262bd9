"""cliplora: few-shot CLIP-LoRA adapters as zero-overhead production classifiers.

This package holds what every stage shares: the tensor contract, the error types,
image preprocessing, the model-repository layout and the command line.
"""

__version__ = "0.1.0"
