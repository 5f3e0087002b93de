"""Deprecated path: training's reporting moved to gpt2.training.metrics; metrics.jsonl's name and
read_metrics live beside the run directory's layout (gpt2.checkpoint.layout). Names imported from
here keep working for one release, with a warning."""

from __future__ import annotations

from gpt2._compat import moved

_NEW = "gpt2.training.metrics"
__getattr__ = moved(
    __name__,
    {
        **{
            name: f"{_NEW}:{name}"
            for name in (
                "PEAK_TFLOPS",
                "RunLogger",
                "environment_info",
                "flops_per_token",
                "format_duration",
                "mfu",
                "peak_flops",
            )
        },
        "METRICS_FILE": "gpt2.checkpoint.layout:METRICS",
        "read_metrics": "gpt2.checkpoint.layout:read_metrics",
        "parse_record": "gpt2.checkpoint.layout:parse_record",
    },
)
