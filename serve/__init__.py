"""edgellm serve: a lightweight Starlette server for GGUF models (OpenAI-compatible) and a reranker."""
