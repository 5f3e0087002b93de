"""Serving: an OpenAI-compatible HTTP server with continuous batching (`gpt2 serve`, extra `.[serve]`).

sampling.py   per-row sampling with batch-independent random numbers
batch.py      slot KV cache, padded prefill, the decode step, their CUDA graphs
engine.py     the engine thread: queue, slots, continuous batching, pipelined steps
protocol.py   /v1/completions request checks and OpenAI's error shape
chat.py       /v1/chat/completions: messages, chat templates, the chat answer shapes
tokenization.py  /tokenize, /detokenize, /tokenizer_info in vLLM's shapes
text.py       incremental detokenization, stop strings, logprobs blocks
stream.py     one answer, as JSON or server-sent events
handling.py   request to answer: parsing off the event loop, queueing, collecting, disconnects
guard.py      the HTTP edge: CORS, body limit, API keys, answers counted by status
metrics.py    /metrics (Prometheus text format, vLLM's names)
app.py        the Starlette app (routes, health, start-up, the engine-to-event-loop bridge)
server.py     build, warm up, run (uvicorn), ServerThread for tests and benchmarks
process.py    the engine in its own process (gpt2 serve's default), behind the Engine's interface
"""
