"""Models by job: loading (device, safetensors, adapters), chat templates, generation, GGUF files."""
