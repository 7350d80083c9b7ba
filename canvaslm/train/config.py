"""Training configuration: typed dataclasses read from a TOML file and checked before any compute.

Each mistake (an unknown section or key, with a "did you mean" hint; a wrong type; a missing required key; a value
out of range) is a `ConfigError` that names the file, the `section.key`, what was expected and what was found.
`[data]`, `[objective]` and `[eval]` are free-form tables handed to the task, which checks them with `read_section`.
Paths (model.source, train.out_dir, train.resume) are taken relative to the working directory, as given.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from canvaslm.errors import CanvasError, CheckpointError

DTYPES = ("float32", "bfloat16", "float16")
# names other tools use (TRL, PEFT, mlx-lm), so that a near miss of one of them still points at our key
ALIASES = {"learning_rate": "lr", "iters": "max_steps", "max_iters": "max_steps", "num_train_steps": "max_steps",
           "gradient_accumulation_steps": "grad_accum", "max_grad_norm": "grad_clip", "warmup": "warmup_steps",
           "per_device_train_batch_size": "batch_size", "r": "rank", "lora_alpha": "alpha",
           "lora_dropout": "dropout", "target_modules": "targets", "output_dir": "out_dir"}


class ConfigError(CanvasError):
    """A training configuration that cannot be used as written."""

    def __init__(self, source: object, key: str, problem: str, *, expected: object = None, found: object = None,
                 hint: str | None = None) -> None:
        parts = [f"{source}: {key}: {problem}"]
        if expected is not None:
            parts.append(f"expected {expected}")
        if found is not None:
            parts.append(f"found {found}")
        message = "; ".join(parts) + (f" ({hint})" if hint else "")
        super().__init__(message)
        self.source, self.key, self.expected, self.found = source, key, expected, found


def _check(predicate: Callable[[Any], bool], expected: str) -> dict[str, Any]:
    return {"check": (predicate, expected)}


POSITIVE = _check(lambda v: v > 0, "a value > 0")
NON_NEGATIVE = _check(lambda v: v >= 0, "a value >= 0")


@dataclass(frozen=True)
class ModelConfig:
    source: str | None = None                    # HF directory, .gguf file or registered name
    init: dict[str, Any] | None = None           # llama config.json fields of a randomly initialised model
    diffusion_canvas_length: int | None = field(default=None, metadata=POSITIVE)  # to_diffusion(n) an AR model
    # layers to deepen a Llama-family model to (a multiple of its own): each layer followed by copies that add
    # nothing until trained (`Model.deepened`), so a run continues a smaller trained model with more depth
    deepen_to: int | None = field(default=None, metadata=POSITIVE)
    dtype: str = field(default="float32", metadata={"choices": DTYPES})  # weights (and AdamW master) dtype


@dataclass(frozen=True)
class OptimConfig:
    max_steps: int = field(metadata=POSITIVE)    # optimizer steps
    lr: float = field(default=1e-4, metadata=POSITIVE)
    betas: tuple[float, float] = field(default=(0.9, 0.999),
                                       metadata=_check(lambda v: all(0 <= b < 1 for b in v), "values in [0, 1)"))
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)
    warmup_steps: int = field(default=0, metadata=NON_NEGATIVE)
    min_lr_ratio: float = field(default=0.1, metadata=_check(lambda v: 0 <= v <= 1, "a value in [0, 1]"))
    grad_clip: float = field(default=1.0, metadata=NON_NEGATIVE)  # max global grad norm; 0 = no clipping
    grad_accum: int = field(default=1, metadata=POSITIVE)         # micro-batches per optimizer step (per rank)
    batch_size: int = field(default=1, metadata=POSITIVE)         # examples per micro-batch
    # a wall-clock budget (a lease): the cosine decay runs on whichever of steps and minutes is further along, and
    # the run stops, evaluates and saves once the minutes are spent; None = steps alone (and exact resume)
    max_minutes: float | None = field(default=None, metadata=POSITIVE)


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    rank: int = field(default=16, metadata=POSITIVE)
    alpha: float = field(default=32.0, metadata=POSITIVE)
    dropout: float = field(default=0.0, metadata=_check(lambda v: 0 <= v < 1, "a value in [0, 1)"))
    targets: str | list[str] = "all-linear"      # "all-linear" (every nn.Linear but lm_head) or module-name suffixes
    modules_to_save: list[str] = field(default_factory=list)  # modules trained in full (e.g. a new head)
    # "all": the adapters act everywhere; "canvas": only in the canvas pass of a block-diffusion model, whose causal
    # pass stays the AR parent (no backward through it; the model still decodes autoregressively as the parent)
    scope: str = field(default="all", metadata={"choices": ("all", "canvas")})
    init: str | None = None                      # an adapter folder (PEFT layout) to start from, e.g. a shipped asset's


@dataclass(frozen=True)
class RunConfig:
    out_dir: str
    seed: int = 0
    device: str = "auto"                         # auto (cuda when available) | cpu | cuda | cuda:N
    # bfloat16 autocast: "auto" where it is fast (CUDA; CPUs with AMX or AVX-512 BF16), true always, false never
    bf16: bool | str = field(default="auto", metadata=_check(lambda v: v in (True, False, "auto"),
                                                             'true, false or "auto"'))
    compile: bool = False                        # torch.compile the model
    save_every: int = field(default=0, metadata=NON_NEGATIVE)  # steps between checkpoints; 0 = only at the end
    eval_every: int = field(default=0, metadata=NON_NEGATIVE)  # steps between evaluations; 0 = only at the end
    log_every: int = field(default=1, metadata=POSITIVE)
    resume: bool | str = False                   # true / "latest": newest checkpoint in out_dir if any; or a path
    distributed: str = field(default="ddp", metadata={"choices": ("ddp", "fsdp")})  # under torchrun


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    optim: OptimConfig
    train: RunConfig
    data: dict[str, Any]
    objective: dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: dict[str, Any] = field(default_factory=dict)
    source: str = "<config>"                     # the file it was read from, for error messages

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TYPED_SECTIONS: dict[str, type] = {"model": ModelConfig, "optim": OptimConfig, "lora": LoraConfig,
                                   "train": RunConfig}
FREE_SECTIONS = ("data", "objective", "eval")
REQUIRED_SECTIONS = ("model", "optim", "train", "data")
T = TypeVar("T")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read, override (`section.key=value`, the value in TOML syntax or a bare string) and check a config file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "file", "config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, "file", f"cannot read the config file ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "file", f"invalid TOML ({e})") from e
    return parse_config(apply_overrides(raw, overrides), str(path))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `raw` with each `a.b.c=value` set; values parse as TOML (`1e-3`, `true`, `[1, 2]`) or else stay
    strings. Nested tables are copied, never shared with `raw`."""
    result = _copy_tables(raw)
    for item in overrides:
        dotted, sep, text = item.partition("=")
        keys = dotted.strip().split(".")
        if not sep or len(keys) < 2 or not all(keys):
            raise ConfigError("command line", item, "bad override", expected="section.key=value")
        table = result
        for key in keys[:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError("command line", dotted, "cannot set a key inside a non-table value")
        table[keys[-1]] = _parse_value(text.strip())
    return result


def parse_config(raw: Mapping[str, Any], source: str = "<config>") -> TrainConfig:
    """Check a parsed TOML document and build the config (the file is `source` in error messages)."""
    known = [*TYPED_SECTIONS, *FREE_SECTIONS]
    for name, value in raw.items():
        if name not in known:
            raise ConfigError(source, f"[{name}]", "unknown section", expected=f"one of {known}",
                              hint=did_you_mean(name, known))
        if not isinstance(value, dict):
            raise ConfigError(source, f"[{name}]", "must be a table", expected=f"a [{name}] section",
                              found=_describe(value))
    for name in REQUIRED_SECTIONS:
        if name not in raw:
            raise ConfigError(source, f"[{name}]", "missing section")
    sections = {name: read_section(cls, raw.get(name, {}), source, name) for name, cls in TYPED_SECTIONS.items()}
    config = TrainConfig(**sections, data=dict(raw["data"]), objective=dict(raw.get("objective", {})),
                         eval=dict(raw.get("eval", {})), source=source)
    _check_across(config)
    return config


def read_section(cls: type[T], raw: Mapping[str, Any], source: str, section: str) -> T:
    """Build dataclass `cls` from one TOML table: unknown keys, missing required keys, wrong types and values
    failing a field's `check`/`choices` metadata raise ConfigError. Tasks use it for their free-form sections."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise ConfigError(source, f"{section}.{key}", "unknown key", expected=f"one of {sorted(fields)}",
                              hint=did_you_mean(key, list(fields)))
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(source, key, "missing required key", expected=_type_name(hints[name]))
            continue
        ok, value = _coerce(raw[name], hints[name])
        if not ok:
            raise ConfigError(source, key, "wrong type", expected=_type_name(hints[name]), found=_describe(raw[name]))
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(source, key, "unsupported value", expected=f"one of {list(choices)}",
                              found=repr(value), hint=did_you_mean(str(value), list(choices)))
        check = f.metadata.get("check")
        if check is not None and value is not None and not check[0](value):
            raise ConfigError(source, key, "value out of range", expected=check[1], found=repr(value))
        values[name] = value
    return cls(**values)


def _check_across(config: TrainConfig) -> None:
    """Rules that involve more than one key."""
    model, source = config.model, config.source
    if (model.source is None) == (model.init is None):
        raise ConfigError(source, "model.source / model.init", "give exactly one",
                          expected="source = an HF directory, .gguf file or registered name, or init = a table "
                                   "of llama config fields", found="both" if model.source else "neither")
    if model.init is not None:
        _check_init(model, source)
    if config.optim.warmup_steps > config.optim.max_steps:
        raise ConfigError(source, "optim.warmup_steps", "longer than the run",
                          expected=f"<= optim.max_steps ({config.optim.max_steps})",
                          found=config.optim.warmup_steps)
    resume = config.train.resume
    if isinstance(resume, str) and not resume:
        raise ConfigError(source, "train.resume", "empty path", expected='true, false, "latest" or a checkpoint path')


def init_fields(model: ModelConfig) -> dict[str, Any]:
    """The config.json fields of a `model.init` model: a grid is a shape of the canvas, so a model with
    `canvas_grid` is built in diffusion mode with `diffusion_canvas_length` as its canvas."""
    fields = {"model_type": "llama", **(model.init or {})}
    if "canvas_grid" in fields:
        fields.setdefault("canvas_length", model.diffusion_canvas_length)
    return fields


def _check_init(model: ModelConfig, source: str) -> None:
    """Read `model.init` as a config.json would be read (missing or mistyped fields raise CheckpointError), and
    reject the keys that reading never looked at: from_hf ignores unknown keys, which would hide a typo."""
    from canvaslm.models import llama

    init = model.init or {}
    seen = _KeyRecorder(init_fields(model))
    try:
        llama.Config.from_hf(seen, f"{source} [model.init]")
    except CheckpointError as e:  # a required key missing because it is misspelt: name the misspelling
        typos = [k for k in init if k != e.field and difflib.get_close_matches(str(e.field), [k], cutoff=0.8)]
        if typos:
            raise ConfigError(source, f"model.init.{typos[0]}", "unknown llama config key",
                              hint=f"did you mean {e.field!r}?") from e
        raise
    unknown = sorted(set(init) - seen.read - {"initializer_range"})  # read by the trainer's build_model
    if unknown:
        raise ConfigError(source, f"model.init.{unknown[0]}", "unknown llama config key",
                          hint=did_you_mean(unknown[0], sorted(seen.read)))


class _KeyRecorder(dict):
    """A dict that remembers which keys were looked up."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


def did_you_mean(name: str, candidates: list[str]) -> str | None:
    """A "did you mean 'x'?" hint for a misspelt name (also for other tools' names of our keys), or None."""
    pool = {c: c for c in candidates}
    pool.update({alias: target for alias, target in ALIASES.items() if target in candidates})
    close = difflib.get_close_matches(name, list(pool), n=1, cutoff=0.6)
    return f"did you mean {pool[close[0]]!r}?" if close else None


# ---- types ------------------------------------------------------------------------------------------------------

def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(matches, value converted to the field's type): ints pass as floats, arrays as tuples; bools are not ints."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            ok, converted = _coerce(value, arm)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is Any:
        return True, value
    if hint is bool or hint is str:
        return isinstance(value, hint), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if origin is dict:
        return isinstance(value, dict), value
    if origin in (list, tuple) and isinstance(value, list):
        arms = args if origin is tuple else (args[0],) * len(value)
        if len(arms) != len(value):
            return False, value
        items = [_coerce(v, arm) for v, arm in zip(value, arms, strict=True)]
        return all(ok for ok, _ in items), origin(v for _, v in items)
    return False, value


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"an array of {len(args)} {_type_name(args[0]).removeprefix('a ')}s"
    if origin is list:
        return f"an array of {_type_name(args[0]).removeprefix('a ')}s"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table"}
    return names.get(origin or hint, str(hint))


def _describe(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    return f"{kinds.get(type(value), type(value).__name__)} {value!r}"


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word such as a path


def _copy_tables(table: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy_tables(v) if isinstance(v, Mapping) else v for k, v in table.items()}
