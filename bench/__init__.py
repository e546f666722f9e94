"""The bench stage: compare GGUF quantization variants (`edgellm bench quant`) and load-test an
OpenAI-compatible server (`edgellm bench serve`)."""
