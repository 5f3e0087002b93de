"""Filling a TrainingConfig from TOML files and the command line: typed conversion of every value,
unknown names with a "did you mean", and the order in which sources override each other."""

from __future__ import annotations

import difflib
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from gpt2.checkpoint import TRAIN_CONFIG, load_train_config
from gpt2.training.config import QUICKSTART, TrainingConfig
from gpt2.training.plan import resolve_resume

_POWER = re.compile(r"([0-9]+)\*\*([0-9]+)")  # 2**19
_MAX_INT = 2**63 - 1  # the largest count anything here can hold


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainingConfig)


def base_type(annotation: Any) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed) of a field annotation like `int | None`."""
    args = typing.get_args(annotation)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return annotation, False


def convert_value(name: str, value: Any, source: str) -> Any:
    """A config value of the field's type, from TOML (typed) or the command line (a string)."""
    types = field_types()
    if name not in types:
        raise ValueError(unknown_field_message(name, source))
    kind, optional = base_type(types[name])
    where = f"{name} in {source}"
    if value is None:  # JSON null (a saved config); TOML has no null
        if optional:
            return None
        raise ValueError(f"{where} must be set, got null")
    unset_words = ("none", "null", "auto") if kind is bool else ("none", "null")  # compile = "auto"
    if isinstance(value, str) and optional and value.strip().lower() in unset_words:
        return None
    if kind is bool:
        return _to_bool(value, where)
    if kind is int:
        return _to_int(value, where)
    if kind is float:
        return _to_float(value, where)
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return value


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{where} must be true or false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    """Whole numbers: 524288, 524_288, 5e5, 2**19 (parsed, never evaluated)."""
    number: float | int | None = None  # a bool is not a count (True would pass as 1)
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        number = _parse_int(value.strip().replace("_", ""))
    if number is None:
        raise ValueError(f"{where} must be a whole number, got {value!r}")
    if abs(number) > _MAX_INT:
        raise ValueError(f"{where} must be a whole number between -{_MAX_INT} and {_MAX_INT}, got {value!r}")
    return int(number)


def _parse_int(text: str) -> int | None:
    power = _POWER.fullmatch(text)
    if power:
        base, exponent = int(power.group(1)), int(power.group(2))
        if base > 1 and exponent * math.log2(base) > 63:
            return None  # too large to be a setting; never computed
        return base**exponent
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None


def _to_float(value: Any, where: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip().replace("_", ""))
        except ValueError:
            number = None
    if number is None:
        raise ValueError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return number


def unknown_field_message(name: str, source: str) -> str:
    names = [f.name for f in fields(TrainingConfig)]
    close = difflib.get_close_matches(name.replace("-", "_"), names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown training setting {name!r} in {source}; {hint}(`gpt2 train --help` lists them all)"


def read_toml(path: str | Path) -> dict[str, Any]:
    """A flat TOML file of TrainingConfig fields (tables are flattened: [model] n_layer = 12 works too)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; a config file is TOML") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if isinstance(v, dict):
                raise ValueError(f"{path}: nested table {key}.{k} is not supported; settings are flat")
            flat[k.replace("-", "_")] = v
    return flat


def build_config(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    quickstart: bool = False,
) -> TrainingConfig:
    """The resolved config: defaults <- quickstart preset <- the resumed checkpoint's saved config
    <- config_file <- overrides (command-line strings or typed values). Unknown names are errors."""
    values: dict[str, Any] = dict(QUICKSTART) if quickstart else {}
    from_file = {}
    if config_file is not None:
        source = str(config_file)
        from_file = {k: convert_value(k, v, source) for k, v in read_toml(config_file).items()}
    from_cli = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    from_cli = {k: convert_value(k, v, "the command line") for k, v in from_cli.items()}
    resume = from_cli.get("resume", from_file.get("resume", values.get("resume")))
    explicit_out = from_cli.get("out_dir", from_file.get("out_dir"))
    if resume is not None:
        out_dir = explicit_out or values.get("out_dir", TrainingConfig.out_dir)
        run_dir, ckpt = resolve_resume(resume, out_dir)
        if ckpt is not None:
            values.update(saved_config(ckpt))
        if resume != "auto":
            if explicit_out is not None and Path(explicit_out).expanduser().resolve() != run_dir.resolve():
                raise ValueError(f"--resume {resume} continues the run in {run_dir}; drop --out_dir {explicit_out}")
            values["out_dir"] = str(run_dir)
    values.update(from_file)
    values.update(from_cli)
    explicit = {**from_file, **from_cli}
    if values.get("data") is not None and "data_root" in explicit:
        origin = "the quickstart" if "data" not in explicit and quickstart else "--data"
        raise ValueError(
            f"data_root {explicit['data_root']} would be ignored: {origin} sets data = {values['data']!r}, which "
            "is tokenized into OUT_DIR/data; pass --data none to train on data_root"
        )
    return TrainingConfig(**values)


def saved_config(ckpt: Path) -> dict[str, Any]:
    """The settings a checkpoint was saved with, typed (settings of older versions that no longer
    exist are dropped; where the run lives is decided by the caller)."""
    saved = load_train_config(ckpt)
    names = field_types()
    saved = {k: v for k, v in saved.items() if k in names and k not in ("resume", "out_dir")}
    return {k: convert_value(k, v, str(ckpt / TRAIN_CONFIG)) for k, v in saved.items()}
