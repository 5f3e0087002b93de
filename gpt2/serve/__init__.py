"""Serving: an OpenAI-compatible HTTP server over gpt2.inference's engine (`gpt2 serve`, extra `.[serve]`).

config.py     ServeConfig and HTTPConfig: the settings gpt2 serve's flags fill (importable without the extra)
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
process.py    the engine in its own process (gpt2 serve's default), behind gpt2.inference.EngineClient

engine.py, batch.py and sampling.py are the old paths of gpt2.inference's engine, runner and sampling
(they work for one release, with a DeprecationWarning).
"""
