"""Serving: an OpenAI-compatible HTTP server with continuous batching (`gpt2 serve`, extra `.[serve]`).

sampling.py   per-row sampling with batch-independent random numbers
batch.py      slot KV cache, padded prefill, the decode step, their CUDA graphs
engine.py     the engine thread: queue, slots, continuous batching, pipelined steps
protocol.py   /v1/completions request checks and OpenAI's error shape
text.py       incremental detokenization, stop strings, logprobs blocks
stream.py     one answer, as JSON or server-sent events
app.py        the Starlette app (routes, errors, the engine-to-event-loop bridge)
server.py     build, warm up, run (uvicorn), ServerThread for tests and benchmarks
process.py    the engine in its own process (gpt2 serve's default), behind the Engine's interface
"""
