"""A tiny training config for the trainer tests: a 2-layer random Llama on the `causal-lm-toy` task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from canvaslm.train.config import TrainConfig, parse_config

MODEL_INIT = {"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def toy_raw(out_dir: str | Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The raw TOML document; each keyword updates one section (e.g. optim={"max_steps": 3})."""
    raw: dict[str, Any] = {
        "model": {"init": dict(MODEL_INIT)},
        "data": {"task": "causal-lm-toy", "seq_len": 12},
        "optim": {"max_steps": 6, "lr": 3e-3, "warmup_steps": 2, "batch_size": 2},
        # float32: these tests compare runs to 1e-6 (bfloat16 autocast, the default where the CPU has it, would
        # round differently between a double batch and two accumulated halves)
        "train": {"out_dir": str(out_dir), "log_every": 1, "bf16": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def toy_config(out_dir: str | Path, **sections: dict[str, Any]) -> TrainConfig:
    return parse_config(toy_raw(out_dir, **sections), "toy.toml")


def to_toml(raw: dict[str, Any]) -> str:
    """Enough TOML for toy_raw's documents (tables of scalars, arrays and inline tables)."""
    lines = []
    for section, table in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return repr(value)
