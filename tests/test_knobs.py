"""One knob list: the CLI flags, the server's request fields and the LM defaults all come from canvaslm.knobs and
agree with it on names, types, ranges and defaults."""

from __future__ import annotations

import argparse
import dataclasses

import pydantic
import pytest

from canvaslm import cli
from canvaslm.diffusion.sampling import DiffusionSampling
from canvaslm.engine import ar
from canvaslm.engine.lm import AR_SAMPLING
from canvaslm.errors import GenerationError
from canvaslm.knobs import KNOBS, Knob, defaults, knobs
from canvaslm.server.protocol import ChatRequest, CompletionRequest, Sampling


def _flags(command: str) -> dict[str, argparse.Action]:
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {a.dest: a for a in sub._actions}


def _just_outside(knob: Knob) -> list[object]:
    """Values a knob must refuse: past each bound, a wrong type, an unknown choice."""
    if knob.choices:
        return ["no-such-" + knob.name, 1]
    bad: list[object] = ["1", True]
    if knob.low is not None:
        bad.append(knob.low if knob.low_open else knob.low - 1)
    if knob.high is not None:
        bad.append(knob.high + 1)
    if knob.kind is int:
        bad.append(1.5)
    return bad


def _inside(knob: Knob) -> object:
    return knob.choices[-1] if knob.choices else knob.high if knob.high is not None else knob.default


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_every_knob_is_a_flag_of_its_type(command):
    flags = _flags(command)
    for knob in KNOBS:
        action = flags[knob.name]
        assert action.type is knob.kind and action.default is None
        assert tuple(action.choices or ()) == knob.choices
        assert knob.help.replace("%", "%%") in action.help
    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    shown = "".join(sub.format_help().split())  # argparse wraps lines, at hyphens too
    for knob in KNOBS:  # every flag's help renders (argparse reads a bare % as a format), with its mode
        assert "".join(knob.help.split()) in shown
    assert "everydecoding:non-gram" in shown and "AR:samplingtemperature" in shown


def test_the_request_fields_are_the_knobs_with_their_ranges():
    fields = Sampling.model_fields
    assert {k.name for k in KNOBS} <= fields.keys()
    assert issubclass(ChatRequest, Sampling) and issubclass(CompletionRequest, Sampling)
    base = {"messages": [{"role": "user", "content": "hi"}]}
    for knob in KNOBS:
        assert fields[knob.name].default is None
        assert ChatRequest(**base, **{knob.name: _inside(knob)}).sampling(knob.mode == "diffusion") == \
            {knob.name: _inside(knob)}
        for bad in _just_outside(knob):
            if isinstance(bad, (str, bool)) and not knob.choices:
                continue  # JSON types: pydantic's lax mode reads "1" as 1 and true as 1, as a client means them
            with pytest.raises(pydantic.ValidationError, match=knob.name):
                ChatRequest(**base, **{knob.name: bad})


def test_the_model_side_checks_are_the_same_ranges():
    for knob in knobs("diffusion"):
        base = DiffusionSampling(commit_check=0.01)  # adjacent_repeats = "drop" needs the check
        assert base.replace(**{knob.name: _inside(knob)}) is not None
        for bad in _just_outside(knob):
            with pytest.raises(GenerationError, match=knob.name):
                DiffusionSampling().replace(**{knob.name: bad})
    for knob in knobs("ar"):
        options = {**defaults("ar"), knob.name: _inside(knob)}
        ar.check_options(1, **options)
        for bad in _just_outside(knob):
            with pytest.raises(GenerationError, match=knob.name):
                ar.check_options(1, **{**options, knob.name: bad})


def test_the_defaults_are_the_knobs_defaults():
    assert dataclasses.asdict(DiffusionSampling()) == defaults("diffusion")
    assert AR_SAMPLING == defaults("ar")
    assert [f.name for f in dataclasses.fields(DiffusionSampling)] == [k.name for k in knobs("diffusion")]


def test_a_new_knob_reaches_every_surface(monkeypatch):
    """Adding an option touches one place: the list. (The server's model and DiffusionSampling are built at import,
    so this checks the CLI, which reads the list when the parser is built.)"""
    extra = Knob("extra_knob", float, 0.5, "a knob added by a test", "diffusion", low=0)
    monkeypatch.setattr(cli, "SAMPLING_FLAGS", {**cli.SAMPLING_FLAGS, extra.name: extra})
    assert _flags("generate")["extra_knob"].type is float
