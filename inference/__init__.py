"""Base model, multi-LoRA layers, adapter cache, generation engine, ModelFactory and worker."""
