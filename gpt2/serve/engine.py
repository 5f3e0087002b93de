"""Deprecated path: the engine moved to gpt2.inference (engine.py; the queue and slots to
scheduler.py), where `gpt2 generate` uses it too, and `Request` is named for what it is,
gpt2.inference.Sequence. Names imported from here keep working for one release, with a warning."""

from __future__ import annotations

from gpt2._compat import moved

__getattr__ = moved(
    __name__,
    {
        "Request": "gpt2.inference.scheduler:Sequence",
        "Output": "gpt2.inference.scheduler:Output",
        "QueueFull": "gpt2.inference.scheduler:QueueFull",
        "Engine": "gpt2.inference.engine:Engine",
    },
)
