"""The bench stage: compare GGUF quantization variants (`edgellm bench quant`), load-test an OpenAI-compatible
server (`edgellm bench serve`) and compare the engines with raw llama.cpp (`edgellm bench engines`).

Imports run one way: ``cli`` -> the benchmarks (``quant``, ``loadtest``, ``engine_speed``) -> ``report`` ->
``results``; the benchmarks share ``client`` (the one streaming chat client), ``stats`` (the one percentile),
``tables`` (the one Markdown table writer), ``charts`` (the one matplotlib frame and atomic PNG write) and
``errors``; ``quant`` runs ``worker`` (with ``quality`` and ``lowlevel``) in a fresh process per variant.
"""
