"""`gpt2 generate` on CUDA picks its decode path by the work: a CUDA graph only when enough new
tokens pay for capturing it (the choice is plain logic, tested on a CPU)."""

from __future__ import annotations

import torch

from gpt2.generation import GRAPH_MIN_NEW_TOKENS, use_cuda_graph


def test_generate_captures_a_graph_only_for_long_answers():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not use_cuda_graph(cuda, 60)  # a short answer: eager steps, no capture
    assert use_cuda_graph(cuda, GRAPH_MIN_NEW_TOKENS) and use_cuda_graph(cuda, 1000)
    assert not use_cuda_graph(cpu, 1000)
    assert use_cuda_graph(cuda, 5, requested=True) and not use_cuda_graph(cuda, 1000, requested=False)
