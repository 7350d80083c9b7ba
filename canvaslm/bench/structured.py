"""Structured-output tasks and `canvaslm bench structured`: schema-bound JSON and code infill, diffusion vs AR.

* Schema tasks: JSON objects for a fictional record (person, product, ...) with 3-6 fields drawn from a pool that
  covers strings with lengths, bounded integers and numbers, enums, booleans, arrays with min/maxItems and nested
  objects; every property required and no others (as OpenAI's strict mode). Deterministic from the seed.
* Infill tasks: one line cut out of a function of the Python standard library (this interpreter's copy): the
  prefix is the function up to that line, the suffix the lines after it. The model writes the middle; the
  diffusion model gets the middle's true length in tokens (the usual single-line infill setting, as in
  HumanEval-infilling with oracle length), the AR model sees only the prefix and writes one line.

Both are run on one network: the diffusion scaffold (`canvaslm.engine.structured`, `LM.infill`) in block-diffusion
mode, and the same weights decoding autoregressively, constrained by llguidance with fast-forwarded forced tokens
(`canvaslm.engine.guided`). An AR checkpoint is put in block-diffusion mode for the first (a zero-initialised
self-conditioning block: the weights are the AR ones, so without diffusion training its canvases are poor).
"""

from __future__ import annotations

import ast
import copy
import importlib
import json
import random
import statistics
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from canvaslm.engine.guided import (GuidedDecodingError, guided_generate, json_grammar, llg_tokenizer,
                                    regex_grammar, require_llguidance)
from canvaslm.engine.lm import LM
from canvaslm.engine.structured import StructuredOutputError, generate_json, violations
from canvaslm.plotting import new_figure, save

FIELDS: dict[str, dict[str, Any]] = {
    "name": {"type": "string", "minLength": 1, "maxLength": 40},
    "title": {"type": "string", "minLength": 1, "maxLength": 60},
    "city": {"type": "string", "maxLength": 30},
    "email": {"type": "string", "maxLength": 50},
    "summary": {"type": "string", "maxLength": 80},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
    "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
    "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    "price": {"type": "number", "minimum": 0, "maximum": 10000},
    "weight_kg": {"type": "number", "exclusiveMinimum": 0, "maximum": 500},
    "in_stock": {"type": "boolean"},
    "verified": {"type": "boolean"},
    "status": {"enum": ["active", "inactive", "pending"]},
    "priority": {"enum": ["low", "medium", "high", "urgent"]},
    "color": {"enum": ["red", "green", "blue", "black", "white"]},
    "currency": {"const": "EUR"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
    "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 2,
               "maxItems": 4},
    "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 40},
                                                 "city": {"type": "string", "maxLength": 30},
                                                 "zip": {"type": "string", "minLength": 4, "maxLength": 10}},
                "required": ["street", "city", "zip"], "additionalProperties": False},
    "dimensions": {"type": "object", "properties": {"width": {"type": "number", "minimum": 0},
                                                    "height": {"type": "number", "minimum": 0}},
                   "required": ["width", "height"], "additionalProperties": False},
    "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                               "age": {"type": "integer", "minimum": 18, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False},
}
RECORDS = ["person", "product", "book", "movie", "event", "order", "employee", "restaurant", "car", "city"]
# stdlib modules whose functions the infill tasks are cut from (pure Python, stable across 3.11+)
INFILL_MODULES = ["textwrap", "shlex", "fnmatch", "heapq", "bisect", "calendar", "colorsys", "difflib", "glob",
                  "string", "json.encoder", "json.decoder", "csv", "base64", "posixpath", "statistics", "fractions",
                  "ipaddress", "argparse", "configparser", "gettext", "pprint", "random", "tokenize"]


@dataclass(frozen=True)
class SchemaTask:
    prompt: str
    schema: dict[str, Any]


@dataclass(frozen=True)
class InfillTask:
    source: str    # module:function:line
    prefix: str
    middle: str    # the line that was cut out, with its indentation and newline
    suffix: str


def schema_tasks(n: int, seed: int = 0) -> list[SchemaTask]:
    """`n` JSON-schema tasks: a record type and 3-6 required fields from FIELDS, all drawn from `seed`."""
    rng = random.Random(seed)
    tasks = []
    for _ in range(n):
        record = rng.choice(RECORDS)
        names = rng.sample(sorted(FIELDS), rng.randint(3, 6))
        schema = {"type": "object", "properties": {k: FIELDS[k] for k in names}, "required": names,
                  "additionalProperties": False}
        prompt = (f"Write a JSON object describing a fictional {record}, with the fields "
                  f"{', '.join(names)}. Answer with the JSON only.")
        tasks.append(SchemaTask(prompt, schema))
    return tasks


def _functions(module: str) -> Iterator[tuple[str, list[str], ast.FunctionDef]]:
    path = Path(importlib.import_module(module).__file__ or "")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for node in ast.walk(ast.parse("".join(lines))):
        if isinstance(node, ast.FunctionDef) and node.end_lineno is not None:
            yield module, lines, node


def infill_tasks(n: int, seed: int = 0, max_lines: int = 30) -> list[InfillTask]:
    """`n` single-line infill tasks cut from INFILL_MODULES: a statement line (not a docstring, at most 80
    characters) in the body of a function of at most `max_lines` lines; the prefix is the function up to that
    line and the suffix the rest of it, so the true middle makes a function that parses."""
    candidates = []
    for module in INFILL_MODULES:
        for module_name, lines, node in _functions(module):
            first, last = node.lineno - 1, node.end_lineno or node.lineno
            if node.decorator_list or last - first > max_lines:
                continue
            body = node.body[1:] if ast.get_docstring(node) else node.body
            for statement in body:
                at = statement.lineno - 1
                if statement.lineno != statement.end_lineno or len(lines[at]) > 80 or at + 1 >= last:
                    continue
                task = InfillTask(f"{module_name}:{node.name}:{statement.lineno}", "".join(lines[first:at]),
                                  lines[at], "".join(lines[at + 1:last]))
                if _parses(task.prefix + task.middle + task.suffix):
                    candidates.append(task)
    if len(candidates) < n:
        raise ValueError(f"only {len(candidates)} infill candidates in the standard library, {n} asked for")
    return random.Random(seed).sample(candidates, n)


def _parses(code: str) -> bool:
    """Whether `code` (a function, maybe a method's indented source) is valid Python."""
    body = textwrap.dedent(code)
    try:
        ast.parse(body if not body.startswith((" ", "\t")) else "if True:\n" + textwrap.indent(body, " "))
    except SyntaxError:
        return False
    return True


def _summary(rows: list[dict[str, Any]], valid_key: str) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in rows)
    passes = sum(r["forward_passes"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    return {"tasks": len(rows), "valid_rate": round(sum(r[valid_key] for r in rows) / max(len(rows), 1), 4),
            "tokens": tokens, "forward_passes": passes, "seconds": round(seconds, 2),
            "tokens_per_forward": round(tokens / max(passes, 1), 3),
            "tokens_per_second": round(tokens / seconds, 2) if seconds else None,
            "median_seconds": round(statistics.median(r["seconds"] for r in rows), 3) if rows else None}


def run_schema(diffusion: LM, ar: LM, tasks: list[SchemaTask], seed: int, sampling: dict[str, Any],
               progress: Progress) -> dict[str, Any]:
    tokenizer = diffusion.require_tokenizer()
    llg = llg_tokenizer(tokenizer, ar.network.vocab_size)
    rows: dict[str, list[dict[str, Any]]] = {"diffusion": [], "ar_guided": []}
    job = progress.add_task("schema tasks", total=len(tasks))
    for i, task in enumerate(tasks):
        prompt = diffusion.chat_prompt_ids([{"role": "user", "content": task.prompt}])
        start = time.perf_counter()
        try:
            answer = generate_json(diffusion, prompt, task.schema, seed=seed + i, **sampling)
            text, passes, error = answer.text, answer.forward_passes, None
        except StructuredOutputError as exc:
            text, passes, error = "", None, str(exc)
        seconds = time.perf_counter() - start
        rows["diffusion"].append(_schema_row(task, text, passes or 0, seconds, tokenizer, error))
        start = time.perf_counter()
        try:
            out = guided_generate(ar.network, llg, prompt, json_grammar(task.schema), 512)
            text, passes, error = tokenizer.decode(out.token_ids), out.forward_passes, None
            error = None if out.finished else "the answer did not finish within 512 tokens"
        except GuidedDecodingError as exc:
            text, passes, error = "", 0, str(exc)
        rows["ar_guided"].append(_schema_row(task, text, passes, time.perf_counter() - start, tokenizer, error))
        progress.advance(job)
    return {name: {**_summary(r, "valid"), "rows": r} for name, r in rows.items()}


def _schema_row(task: SchemaTask, text: str, passes: int, seconds: float, tokenizer: Any,
                error: str | None) -> dict[str, Any]:
    try:
        valid = error is None and not violations(task.schema, json.loads(text))
    except json.JSONDecodeError:
        valid = False
    tokens = len(tokenizer.encode(text, add_special_tokens=False)) if text else 0
    return {"valid": valid, "tokens": tokens, "forward_passes": passes, "seconds": round(seconds, 3), "text": text,
            "error": error}


def run_infill(diffusion: LM, ar: LM, tasks: list[InfillTask], seed: int, sampling: dict[str, Any],
               progress: Progress) -> dict[str, Any]:
    tokenizer = diffusion.require_tokenizer()
    llg = llg_tokenizer(tokenizer, ar.network.vocab_size)
    # one line that can start a Python statement (the cut-out line is one), so no blank line or code fence
    one_line = regex_grammar(r"[ \t]*[A-Za-z_0-9(\[{'\"@*~.\-][^\n]*\n")
    rows: dict[str, list[dict[str, Any]]] = {"diffusion": [], "ar_guided": []}
    job = progress.add_task("infill tasks", total=len(tasks))
    for i, task in enumerate(tasks):
        length = len(tokenizer.encode(task.middle, add_special_tokens=False))
        start = time.perf_counter()
        result = diffusion.infill(task.prefix, task.suffix, max_new_tokens=length, seed=seed + i, **sampling)
        rows["diffusion"].append(_infill_row(task, result.text, len(result.token_ids), result.forward_passes,
                                             time.perf_counter() - start))
        prompt = tokenizer.encode(task.prefix, add_special_tokens=True)
        start = time.perf_counter()
        out = guided_generate(ar.network, llg, prompt, one_line, 2 * length + 8)
        rows["ar_guided"].append(_infill_row(task, tokenizer.decode(out.token_ids), len(out.token_ids),
                                             out.forward_passes, time.perf_counter() - start))
        progress.advance(job)
    summaries = {}
    for name, r in rows.items():
        summaries[name] = {**_summary(r, "parses"),
                           "exact_match": round(sum(x["exact"] for x in r) / max(len(r), 1), 4), "rows": r}
    return summaries


def _infill_row(task: InfillTask, middle: str, tokens: int, passes: int, seconds: float) -> dict[str, Any]:
    line = middle if middle.endswith("\n") else middle + "\n"
    return {"source": task.source, "parses": _parses(task.prefix + line + task.suffix),
            "exact": middle.strip() == task.middle.strip(), "tokens": tokens, "forward_passes": passes,
            "seconds": round(seconds, 3), "text": middle, "expected": task.middle}


def bench_structured(source: str, lm: LM, schema_count: int, infill_count: int, canvas: int, seed: int,
                     sampling: dict[str, Any]) -> dict[str, Any]:
    """Both task sets on `lm`'s weights: the diffusion scaffold / infill vs llguidance-constrained AR decoding."""
    version = require_llguidance().__version__  # UnsupportedError, saying how to install it, before any work
    ar = lm
    if lm.kind != "diffusion":
        diffusion = LM(copy.deepcopy(lm.network).to_diffusion(canvas), lm.tokenizer, source)
    else:
        diffusion = lm
    report: dict[str, Any] = {"model": source, "diffusion_trained": lm.kind == "diffusion",
                              "canvas_length": diffusion.network.canvas_length, "seed": seed,
                              "sampling": sampling, "python": sys.version.split()[0],
                              "ar_decoder": f"llguidance {version} (bitmask + fast-forward), greedy"}
    with Progress() as progress, torch.inference_mode():
        if schema_count:
            report["schema"] = run_schema(diffusion, ar, schema_tasks(schema_count, seed), seed, sampling, progress)
        if infill_count:
            report["infill"] = run_infill(diffusion, ar, infill_tasks(infill_count, seed), seed, sampling, progress)
    return report


def plot_structured(report: dict[str, Any], png: str) -> bool:
    """Validity, tokens per forward and tokens/s of both decoders on both task sets, as grouped bars."""
    sets = [name for name in ("schema", "infill") if name in report]
    figure = new_figure(11, 3.6)
    if figure is None:
        return False
    metrics = [("valid_rate", "valid (schema) / parses (infill)"), ("tokens_per_forward", "tokens per forward"),
               ("tokens_per_second", "tokens/s")]
    for axes, (key, label) in zip(figure.subplots(1, 3), metrics, strict=True):
        for offset, (decoder, name) in enumerate((("diffusion", "diffusion canvas"), ("ar_guided", "AR + llguidance"))):
            values = [report[s][decoder][key] or 0 for s in sets]
            bars = axes.bar([i + 0.38 * offset for i in range(len(sets))], values, 0.36, label=name)
            axes.bar_label(bars, fmt="%.2f", fontsize=7)
        axes.set_xticks([i + 0.19 for i in range(len(sets))],
                        [f"{s} ({report[s]['diffusion']['tasks']})" for s in sets])
        axes.set_title(label, fontsize=9)
    figure.axes[0].legend(fontsize=7)
    trained = "" if report["diffusion_trained"] else ", not trained for diffusion"
    figure.suptitle(f"{Path(str(report['model'])).name}{trained}: canvas {report['canvas_length']}", fontsize=10)
    return save(figure, png)
