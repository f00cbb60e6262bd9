"""`cliplora.finetune`: few-shot CLIP-LoRA training (the paper's recipe) that writes adapters `export` reads."""
