"""Deprecated path: the model runner moved to gpt2.inference.runner (the engine's passes serve
`gpt2 generate` too). Names imported from here keep working for one release, with a warning."""

from __future__ import annotations

from gpt2._compat import moved

__getattr__ = moved(__name__, "gpt2.inference.runner")
