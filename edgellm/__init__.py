"""edgellm: from QLoRA fine-tuning to a fast GGUF HTTP service on an edge box."""

__version__ = "0.1.0"
