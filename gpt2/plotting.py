"""Deprecated path: loss-curve plots moved to gpt2.training.plotting (training-only). Names
imported from here keep working for one release, with a warning."""

from __future__ import annotations

from gpt2._compat import moved

__getattr__ = moved(__name__, "gpt2.training.plotting")
