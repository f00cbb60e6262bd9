"""The model library: base CLIP models and their weights, adapter formats, the merge,
the unmerged reference, the class head and the exported graph.

Used by the export and finetune stages (and the eager baseline of the load tests);
it stands on `cliplora.core` only (docs/architecture.md).
"""
