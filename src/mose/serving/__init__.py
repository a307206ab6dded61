"""Serving MoSE through engines: mose routes each request, an engine (vLLM) generates with the
chain's exported adapter (`mose export`); `mose predict --engine vllm` and `mose serve`."""
