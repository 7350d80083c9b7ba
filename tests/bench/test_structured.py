"""The structured-output task sets and `bench structured`: deterministic, well-formed tasks (every schema is one the
canvas can write, every cut-out line restores a function that parses), and a report whose numbers add up."""

from __future__ import annotations

import ast
import json
import sys
import textwrap

import jsonschema
import pytest

from canvaslm.bench.structured import _parses, bench_structured, infill_tasks, plot_structured, schema_tasks
from canvaslm.engine.structured import scaffold
from canvaslm.errors import UnsupportedError
from tests.reference import tiny_smol_diffusion


def test_schema_tasks_are_deterministic_valid_schemas_the_canvas_can_write():
    tasks = schema_tasks(50, seed=0)
    assert tasks == schema_tasks(50, seed=0) and tasks != schema_tasks(50, seed=1)
    assert len({json.dumps(t.schema, sort_keys=True) for t in tasks}) == 50
    for task in tasks:
        jsonschema.Draft202012Validator.check_schema(task.schema)
        layout = scaffold(task.schema, lambda text: [ord(c) for c in text])
        assert layout.slots and all(name in task.prompt for name in task.schema["properties"])


def test_infill_tasks_cut_one_line_out_of_a_function_that_parses():
    tasks = infill_tasks(50, seed=0)
    assert tasks == infill_tasks(50, seed=0) and len({t.source for t in tasks}) == 50
    for task in tasks:
        assert task.middle.endswith("\n") and task.middle.count("\n") == 1 and task.middle.strip()
        whole = textwrap.dedent(task.prefix + task.middle + task.suffix)
        assert isinstance(ast.parse(whole).body[0], ast.FunctionDef)
        assert task.prefix.lstrip().startswith("def ")
    assert not _parses("def f(x):\n    return (x\n")


def test_bench_structured_reports_both_decoders_on_both_task_sets(tmp_path):
    lm = tiny_smol_diffusion(16, layers=1)
    report = bench_structured("tiny", lm, schema_count=2, infill_count=2, canvas=16, seed=0, sampling={})
    for task_set, valid in (("schema", "valid"), ("infill", "parses")):
        for decoder in ("diffusion", "ar_guided"):
            summary = report[task_set][decoder]
            rows = summary["rows"]
            assert summary["tasks"] == len(rows) == 2
            assert summary["tokens"] == sum(r["tokens"] for r in rows)
            assert summary["forward_passes"] == sum(r["forward_passes"] for r in rows) > 0
            assert summary["valid_rate"] == sum(r[valid] for r in rows) / 2
    assert report["schema"]["diffusion"]["valid_rate"] == 1.0  # the canvas is valid by construction
    for row in report["schema"]["diffusion"]["rows"]:
        assert row["valid"] and json.loads(row["text"])
    assert plot_structured(report, str(tmp_path / "s.png")) and (tmp_path / "s.png").stat().st_size > 0


def test_bench_structured_without_llguidance_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(UnsupportedError, match="pip install llguidance"):
        bench_structured("tiny", tiny_smol_diffusion(16, layers=1), 1, 1, canvas=16, seed=0, sampling={})
