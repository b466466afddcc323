"""Hugging Face models: resolving a name, folder, GGUF file or cache id; loading; the module tree; disk offload."""
