"""Deprecated path: the batched sampler moved to gpt2.inference.sampling (the engine's, for
`gpt2 generate` too). Names imported from here keep working for one release, with a warning."""

from __future__ import annotations

from gpt2._compat import moved

__getattr__ = moved(__name__, "gpt2.inference.sampling")
