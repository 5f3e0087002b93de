"""Fast inference: one engine for every way of generating (gpt2 serve, gpt2 generate, batch jobs).

scheduler.py  queue, cache slots, cancellation, outputs: continuous batching's bookkeeping (no tensors)
runner.py     the model runner: slot KV cache, padded prefill, the decode step (PyTorch or
              gpt2.kernels' fused kernels), their CUDA graphs
state.py      the per-slot device buffers a decode step reads and advances (DecodeState)
sampling.py   per-row sampling on the device, with random numbers that ignore the batch
penalties.py  per-row penalties, logit_bias and min_tokens on the device (token counts per slot)
engine.py     the engine: scheduler + runner, the tensor work between them, pipelined steps, its thread
generate.py   generating in process on the engine (`gpt2 generate`), the sliding window past the context

gpt2.generation stays the readable reference (a plain KV cache, eager decoding, the sampling
formula) that the tests compare this package against; gpt2.serve is the HTTP layer over the engine.
"""

from gpt2.inference.engine import Engine, EngineClient
from gpt2.inference.generate import Generation
from gpt2.inference.runner import BatchDecoder
from gpt2.inference.scheduler import Output, QueueFull, Scheduler, Sequence

__all__ = [
    "BatchDecoder",
    "Engine",
    "EngineClient",
    "Generation",
    "Output",
    "QueueFull",
    "Scheduler",
    "Sequence",
]
