"""Serving: an OpenAI-compatible HTTP server over gpt2.inference's engine (`gpt2 serve`, extra `.[serve]`).

config.py     ServeConfig: the engine settings gpt2 serve's flags fill (importable without the extra)
protocol.py   /v1/completions request checks and OpenAI's error shape
text.py       incremental detokenization, stop strings, logprobs blocks
stream.py     one answer, as JSON or server-sent events
app.py        the Starlette app (routes, errors, the engine-to-event-loop bridge)
server.py     build, warm up, run (uvicorn), ServerThread for tests and benchmarks
process.py    the engine in its own process (gpt2 serve's default), behind gpt2.inference.EngineClient

engine.py, batch.py and sampling.py are the old paths of gpt2.inference's engine, runner and sampling
(they work for one release, with a DeprecationWarning).
"""
