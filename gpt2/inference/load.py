"""A model for inference from what the commands' --model, --device and --dtype say.

The command-line shell wraps load_model with the process-wide matmul precision
(gpt2.commands.common.load_for_inference), which every command that loads a model uses: generate,
eval, validate, export and both ways of serving. This half changes no process-wide setting, so library
code (an engine process started without a loader, tests) can call it too.

On CUDA, while the checkpoint is read and copied to the device, a helper thread pays the first-use
costs of the process that the first prefill and decode step would otherwise pay after loading
(measured on an H100 in `gpt2 generate`'s first run, benchmarks/profile_generate.py): cuBLAS and
attention set-up (~0.3 s of a first prefill) and, where the fused decode kernels will run, importing
Triton and the hash Triton takes of its own installation before it can look up any kernel in its
on-disk cache (~0.5 s, once per process). Most of it runs without the GIL (CUDA library calls,
hashing), so it overlaps the reading and copying of the weights.

For `gpt2 generate` (decode), the thread then rehearses the decoding: a prefill and a decode step per
length bucket on a one-layer model of the checkpoint's shapes (gpt2.loading.known_config: its config.json,
read first, or an OpenAI preset) with zero weights: cuBLAS's and attention's choices for those shapes, and
every fused decode kernel loaded from Triton's cache (compiled on a cold one). One layer has every shape a
layer has, at a fraction of the memory (the weights are on the device twice while loading only for the
embedding and one block). Measured before this step (H100, RESULTS.md): 0.16-0.24 s of the graph capture
after loading was those first launches, and ~0.2 s the first prefill and sampling at the real shapes.

The warm-up is the caller's choice (`warm`, off by default: it starts a thread and a CUDA context); the
shell turns it on for CUDA.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from gpt2.config import GPTConfig
from gpt2.device import compute_dtype, pick_device
from gpt2.loading import ModelSource, known_config, resolve_model
from gpt2.model import GPT


@dataclass(frozen=True)
class ModelSpec:
    """A model to load: --model (hub name, HF-format directory, checkpoint or run directory),
    --device (auto, cpu, cuda, cuda:N, mps) and --dtype (auto, fp32, bf16, fp16; see gpt2.device)."""

    model: str
    device: str = "auto"
    dtype: str = "auto"


def load_model(
    spec: ModelSpec, *, cast_weights: bool = True, warm: bool = False, decode: bool | None = None
) -> tuple[GPT, torch.device]:
    """(model in eval mode, device) of spec: on its device, weights cast to its compute dtype
    (cast_weights=False keeps them as stored, for commands that compute under autocast). warm pays the
    process's first-use costs meanwhile (see the module docstring); decode (with warm), the caller
    decodes next: rehearse it with the fused kernels (True; imports Triton) or PyTorch's step (False)."""
    device = pick_device(spec.device)
    dtype = compute_dtype(spec.dtype, device) if cast_weights else None
    source = resolve_model(spec.model)  # once: a checkpoint's files are hashed here, not again below
    if not warm:
        return GPT.from_pretrained(source, device=device, dtype=dtype).eval(), device
    shapes = _config_or_none(source) if decode is not None else None
    with ThreadPoolExecutor(1, thread_name_prefix="gpt2-warm-up") as pool:
        warming = pool.submit(warm_up, device, dtype or torch.float32, bool(decode), shapes)
        model = GPT.from_pretrained(source, device=device, dtype=dtype)
        try:  # done before the caller uses the device (a CUDA graph capture must be alone)
            warming.result()
        except Exception:  # an optimization only: what really fails fails again where it is used, and says so there
            pass
    return model.eval(), device


def _config_or_none(source: ModelSource) -> GPTConfig | None:
    try:
        return known_config(source)
    except (OSError, ValueError):  # from_pretrained, reading the same source, says what is wrong
        return None


def warm_up(device: torch.device, dtype: torch.dtype, triton: bool = False, shapes: GPTConfig | None = None) -> None:
    """Run what a first prefill runs, on tiny inputs: the CUDA context, cuBLAS (its handle goes back
    to torch's pool for the next thread), layer norm, GELU and masked attention kernels; with triton,
    import gpt2.kernels' decode step and compute Triton's key of its own installation (cached); with
    shapes, a prefill and decode steps on a one-layer model of that config (see _decode_once). Draws no
    random numbers."""
    x = torch.full((1, 1, 16, 64), 0.5, device=device, dtype=dtype)  # (B, heads, T, head size); no RNG drawn
    mask = torch.ones(16, 16, dtype=torch.bool, device=device).tril()
    y = F.scaled_dot_product_attention(x, x, x, attn_mask=mask)
    h = F.gelu(F.layer_norm(y, (64,)) @ x.mT, approximate="tanh")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del h
    if triton:
        from triton.runtime import cache

        import gpt2.kernels.decode  # noqa: F401  (imports triton)

        key = getattr(cache, "triton_key", None)  # Triton internals: absent in some version, nothing warms
        if key is not None:
            key()
    if shapes is not None:
        from gpt2.kernels import supports

        _decode_once(replace(shapes, n_layer=1), device, dtype, fused=triton and supports(shapes))


@torch.no_grad()
def _decode_once(config: GPTConfig, device: torch.device, dtype: torch.dtype, fused: bool) -> None:
    """What `gpt2 generate` of one sample runs before it captures its graphs (a prefill, then one greedy
    decode step at each length bucket) on a model of config (one layer, from warm_up) with zero weights:
    no random numbers drawn, every pick is token 0."""
    from gpt2.inference.runner import BatchDecoder
    from gpt2.inference.sampling import GREEDY

    with torch.device("meta"):
        model = GPT(config, init=False).to(dtype)
    model = model.to_empty(device=device).eval()
    model.lm_head.weight = model.transformer.wte.weight  # to_empty made the tied pair two tensors
    # zeros, not the memory as it came: NaN logits could pick a token id outside the vocabulary, which the
    # next step's embedding would read out of bounds (a sticky CUDA error, the whole process's)
    torch._foreach_zero_(list(model.parameters()))
    decoder = BatchDecoder(model, 1, cuda_graph=False, fused=fused, batch_buckets=[1])
    decoder.prefill([0], [[0] * min(8, config.block_size)])
    for L in decoder.length_buckets:
        decoder.step(1, L, GREEDY)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
