"""Generation engines: separate from HTTP, usable from Python without a server.

``serve.engine.base`` defines the interface the routes talk to; ``serial`` serves one request at a time per model
on llama-cpp-python's high-level API; ``batched`` runs continuous batching on the low-level API.
"""
