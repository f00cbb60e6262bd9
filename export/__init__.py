"""Export: merge a CLIP-LoRA adapter into CLIP and publish a verified ONNX classifier.

Stages, each its own module: `base_model` (open_clip + weights), `lora` /
`lora_paper` / `lora_peft` (adapter formats), `merge` (W' = W + s·B·A), `reference`
(the unmerged, independent PyTorch reference), `head` (class text embeddings),
`onnx_graph` (one uint8 -> logits graph), `verify`, `publish`, and `pipeline`,
which runs them in order.
"""
