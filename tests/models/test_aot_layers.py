"""`canvaslm.load(compile="layers")`: the decoder layer on packed weights compiled ahead of time (AOTInductor) runs
the small passes of a quantized bfloat16 model, causal and canvas, with the eager layers' logits and keys to
bfloat16's precision; it is built once per model shape and loaded after that; models it cannot run say why."""

from __future__ import annotations

import argparse

import pytest
import torch

from canvaslm.errors import CanvasError
from canvaslm.hardware import packed_max_rows as eager_max_rows
from canvaslm.loading import load_model
from canvaslm.models import aot
from canvaslm.models.quant import PackedWeight, forget_bound_layers, quantize
from tests.models.test_bound_layers import passes
from tests.models.test_quant import adapted_tiny_model, tiny_model


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One folder of built libraries for the module's tests: each layer shape is built once."""
    return tmp_path_factory.mktemp("home")


def packed_model():
    model = adapted_tiny_model().to(torch.bfloat16)
    quantize(model, "int4")
    return model


def keys_after(model):
    """The cache's keys of both layers after `passes`' prompt, AR step and commit."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    valid = ids != 0
    valid[1] = True
    with torch.inference_mode():
        cache = model.new_cache(2)
        model(ids, cache, valid)
        model(torch.tensor([[13], [14]]), cache, torch.ones(2, 1, dtype=torch.bool))
        model(torch.tensor([[15, 16, 17, 18]] * 2), cache, torch.ones(2, 4, dtype=torch.bool))
    return cache.keys


def packed_weights(model):
    """Every packed weight of `model`: its linears' and fused groups', causal and canvas, and the head's."""
    found = []
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, PackedWeight):
                found.append(value)
            elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module):
                found += [w for w in vars(value).values() if isinstance(w, PackedWeight)]
    return found


def close(ours, reference):
    """Within bfloat16's rounding of these logits (a few of its ulps at their scale), not bit for bit."""
    scale = reference.abs().max()
    return (ours - reference).abs().max() <= 0.02 * scale and torch.equal(ours.argmax(-1), reference.argmax(-1))


def test_the_compiled_layer_runs_the_small_passes_causal_and_canvas_close_to_the_eager_layers(home):
    model = packed_model()
    reference, reference_keys = passes(model), keys_after(model)
    program = aot.compile_layers(model, home / "compiled", progress=False)
    assert model.layer_program is program and (home / "compiled").is_dir()
    ours = passes(model)
    # each pass the program takes runs both layers: the AR step, the commit, the canvas, and the prompt of 2 x 5
    # rows (an empty cache) where the packed weights take 10 rows (not on AMX CPUs: 8)
    model._pass(canvas=False)  # the causal pass's packed weights
    prompt = min(w.max_rows for w in model._bind_packed().guards) >= 10
    assert program.calls == 2 * (3 + prompt), program.calls
    for name, logits in reference.items():
        assert close(ours[name], logits), (name, (ours[name] - logits).abs().max(), logits.abs().max())
    for ours_k, reference_k in zip(keys_after(model), reference_keys, strict=True):
        assert ours_k.shape == reference_k.shape and close(ours_k.float(), reference_k.float())
    # off again: the eager layers, bit for bit what they gave before
    model.layer_program = None
    forget_bound_layers(model)
    assert all(torch.equal(logits, reference[name]) for name, logits in passes(model).items())


def test_a_prompts_first_chunk_runs_the_program_on_an_empty_cache_close_to_the_eager_layers(home):
    """A prompt's first chunk reads no cached keys: the library takes it with an empty cache's keys, and stores
    the keys and values the eager layers would (the next step reads them)."""
    model, compiled = packed_model(), packed_model()
    program = aot.compile_layers(compiled, home / "compiled", progress=False)
    caches = [m.new_cache(1) for m in (model, compiled)]
    with torch.inference_mode():
        outputs = [m(torch.tensor([[5, 6, 7]]), cache, torch.ones(1, 3, dtype=torch.bool))
                   for m, cache in zip((model, compiled), caches, strict=True)]
        assert program.calls == 2 and close(outputs[1], outputs[0]), (outputs[1] - outputs[0]).abs().max()
        for ours_k, reference_k in zip(caches[1].keys, caches[0].keys, strict=True):
            assert ours_k.shape == reference_k.shape == (1, 2, 3, 16) and close(ours_k.float(), reference_k.float())
        steps = [m(torch.tensor([[8]]), cache, torch.ones(1, 1, dtype=torch.bool))
                 for m, cache in zip((model, compiled), caches, strict=True)]
        assert program.calls == 4 and close(steps[1], steps[0])


def test_a_layer_built_once_is_loaded_by_the_next_model_of_its_shape(home, monkeypatch):
    aot.compile_layers(packed_model(), home / "compiled", progress=False)  # built here unless the test above built it
    built = sorted((home / "compiled").glob("*.pt2"))
    assert len(built) == 2, built  # masked and unmasked; no part file left behind

    def compile_again(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(aot, "_compile", compile_again)
    model = packed_model()
    program = aot.compile_layers(model, home / "compiled", progress=False)
    passes(model)
    assert program.calls > 0


def test_models_the_compiled_layer_cannot_run_say_what_to_change(home):
    with pytest.raises(CanvasError, match="bfloat16"):
        aot.compile_layers(tiny_model(), home / "compiled")  # float32
    with pytest.raises(CanvasError, match="--quantize"):
        aot.compile_layers(tiny_model().to(torch.bfloat16), home / "compiled")  # dense weights


def test_a_failed_build_says_which_file_and_leaves_nothing_to_load(tmp_path, monkeypatch):

    def broken(program, package_path):
        open(package_path, "w").close()  # a partial file, as a build killed midway leaves
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with pytest.raises(CanvasError, match=r"compiled/layer-.*masked\.pt2 failed \(RuntimeError: no C\+\+ compiler"):
        aot.compile_layers(packed_model(), tmp_path / "compiled", progress=False)
    left = list((tmp_path / "compiled").iterdir())
    assert [p.suffix for p in left] == [".failed"] and "no C++ compiler" in left[0].read_text()  # no library


@pytest.mark.parametrize(("flag", "expected"),
                         [([], "auto"), (["--compile"], True), (["--compile-layers"], "layers"),
                          (["--no-compile-layers"], False), (["--compile", "--no-compile-layers"], True)])
def test_the_compile_flag_picks_passes_or_layers(flag, expected, monkeypatch):
    from canvaslm import cli_args, loading
    parser = argparse.ArgumentParser()
    parser.add_argument("--device")
    cli_args.precision_args(parser)
    seen = {}
    monkeypatch.setattr(loading, "load", lambda source, **kw: seen.update(kw))
    load_model(parser.parse_args(flag), "smol")
    assert seen["compile"] == expected
    with pytest.raises(CanvasError, match="give one"):
        load_model(parser.parse_args(["--compile", "--compile-layers"]), "smol")


def test_the_engine_serves_with_the_compiled_layer_what_generate_writes_with_it(home, monkeypatch):
    """Requests served together in one batch draw, on the compiled layer, the tokens each draws alone through
    `LM.generate` on it: the program's rows do not depend on their neighbours. (The packed weights take every pass
    here: a pass past their rows runs on the dense weights, other numbers than the int4 grid's, compiled or not.)"""
    from canvaslm.models.lora import cache_canvas_weights
    from tests.engine.test_batching import alone_and_together, shift_lm

    lm = shift_lm()
    lm.network.to(torch.bfloat16)
    cache_canvas_weights(lm.network)
    quantize(lm.network, "int4")
    for packed in packed_weights(lm.network):
        packed.max_rows = 64
    aot.compile_layers(lm.network, home / "compiled", progress=False)
    batches, run = [], aot.LayerProgram.run

    def counted(self, layer, x, *args):
        out = run(self, layer, x, *args)
        batches.append(x.shape[0] if out is not None else 0)
        return out

    monkeypatch.setattr(aot.LayerProgram, "run", counted)
    options = [{}, {"first_token": "causal"}, {}]
    alone, together = alone_and_together(lm, options)
    assert together == alone and max(batches) == 3  # the program ran the batch of three


def test_a_layer_of_other_packed_weights_is_not_bound_to_the_program(home):
    """The library was traced for one set of packed modes and shapes: layers packed otherwise (int8 here) run the
    eager layers, bit for bit what they gave without it."""
    program = aot.compile_layers(packed_model(), home / "compiled", progress=False)
    model = adapted_tiny_model().to(torch.bfloat16)
    quantize(model, "int8")
    reference = passes(model)
    model.layer_program = program
    forget_bound_layers(model)
    calls = program.calls
    ours = passes(model)
    assert program.calls == calls and all(torch.equal(ours[name], logits) for name, logits in reference.items())


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved block-diffusion Llama of the module's layer shape (its libraries are built once) with a tokenizer,
    canvases of 4 (the packed kernels take their passes, as the shipped default's)."""
    import canvaslm
    from tests.reference import tiny_tokenizer

    canvaslm.LM(tiny_model().to_diffusion(4), tiny_tokenizer(80), "tiny").save(tmp_path / "model")
    return tmp_path / "model"


def test_the_command_runs_the_compiled_layer_by_default_and_writes_what_load_writes_on_it(home, tiny_model_dir,
                                                                                        monkeypatch):
    """`canvaslm generate` compiles the layer by default where it runs (a quantized bfloat16 Llama on the CPU):
    once, then it loads it; its tokens are `canvaslm.load(compile="auto")`'s `generate` on the same path, and
    --no-compile-layers runs the eager layers."""
    import json
    import os
    import subprocess
    import sys

    import canvaslm

    env = {k: v for k, v in os.environ.items() if k != "CANVASLM_COMPILE_LAYERS"} | {"CANVASLM_HOME": str(home)}
    command = [sys.executable, "-m", "canvaslm.cli", "generate", "hello world", "--model", str(tiny_model_dir),
               "-n", "24", "--seed", "0", "--json", "--threads", "1", "--dtype", "bfloat16", "--quantize", "int4"]
    runs = [subprocess.run(command + extra, capture_output=True, text=True, timeout=600, env=env)
            for extra in ([], [], ["--no-compile-layers"])]
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    first, again, eager = (json.loads(run.stdout) for run in runs)  # stdout is the JSON alone, built or not
    assert first["compiled"] == again["compiled"] == "layers" and eager["compiled"] is False
    assert "compiling" not in runs[1].stderr + runs[2].stderr  # built once (here or by a test above)
    assert first["token_ids"] == again["token_ids"]

    monkeypatch.setenv("CANVASLM_HOME", str(home))
    monkeypatch.delenv("CANVASLM_COMPILE_LAYERS")
    lm = canvaslm.load(tiny_model_dir, dtype=torch.bfloat16, quantize="int4", compile="auto")
    assert lm.compiled == "layers"
    prompt = lm.tokenizer.encode("hello world", add_special_tokens=True)
    result = lm.generate([prompt], 24, 0, decoding=lm.decoding_mode(None))
    assert lm.decode_new(result.sequences[0], len(prompt))[0][:24] == first["token_ids"]
    assert lm.network.layer_program.calls > 0


def test_a_default_build_that_fails_says_so_once_and_the_model_runs_its_eager_layers(tiny_model_dir, tmp_path,
                                                                                    monkeypatch, capfd):
    """No C++ compiler (or any failed build): `compile="auto"` prints one line, runs the eager layers (the eager
    model's logits bit for bit), and does not try again on the next load; --compile-layers does, and fails."""
    import canvaslm

    monkeypatch.setenv("CANVASLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CANVASLM_COMPILE_LAYERS")
    tries = []

    def broken(program, package_path):
        tries.append(package_path)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    lm = canvaslm.load(tiny_model_dir, dtype=torch.bfloat16, quantize="int4", compile="auto")
    err = capfd.readouterr().err
    assert lm.compiled is False and lm.network.layer_program is None and len(tries) == 1
    assert err.count("running the eager layers") == 1 and "no C++ compiler" in err, err
    eager = canvaslm.load(tiny_model_dir, dtype=torch.bfloat16, quantize="int4", compile=False)
    reference = passes(eager.network)
    assert all(torch.equal(logits, reference[name]) for name, logits in passes(lm.network).items())
    again = canvaslm.load(tiny_model_dir, dtype=torch.bfloat16, quantize="int4", compile="auto")
    assert again.compiled is False and len(tries) == 1  # not tried again
    assert "failed to build here before" in capfd.readouterr().err
    with pytest.raises(CanvasError, match="no C\\+\\+ compiler"):
        canvaslm.load(tiny_model_dir, dtype=torch.bfloat16, quantize="int4", compile="layers")
    assert len(tries) == 2  # asked for: tried again


def test_the_default_is_off_where_the_layer_does_not_run_or_the_environment_says_so(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    import canvaslm

    monkeypatch.setenv("CANVASLM_HOME", str(tmp_path / "home"))

    def never(*args):
        raise AssertionError("compiled")

    monkeypatch.setattr(aot, "_compile", never)
    monkeypatch.setenv("CANVASLM_COMPILE_LAYERS", "off")
    assert canvaslm.load(tiny_model_dir, dtype=torch.bfloat16, quantize="int4", compile="auto").compiled is False
    monkeypatch.delenv("CANVASLM_COMPILE_LAYERS")
    for dtype, weights in ((torch.float32, "int4"), (torch.bfloat16, "none")):  # the layer does not run these
        assert canvaslm.load(tiny_model_dir, dtype=dtype, quantize=weights, compile="auto").compiled is False
    with pytest.raises(CanvasError, match="expected False, True"):
        canvaslm.load(tiny_model_dir, compile="yes")


def test_passes_of_one_shape_in_a_row_each_read_their_own_positions_and_mask(home, monkeypatch):
    """A pass's rope and mask are laid out once for its layers (`LayerProgram._pass_inputs`): AR steps of the same
    shape, one after another at new positions over more keys (two rows, one padded: a mask each step), each match
    the eager layers' step; and a pass of the same shape with other positions and no mask (a step of another
    sequence) gets its own rope, not the last pass's (a tiny random model's attention barely reads positions, so
    that is checked on the inputs themselves). The steps run on the packed program as on a CPU without AMX, where
    the eager layers take one query through the matmuls in every row count (`one_query_sdpa_max_rows` 0)."""
    monkeypatch.setattr(aot, "one_query_sdpa_max_rows", lambda device_type: 0)
    model = packed_model()
    compiled = packed_model()
    program = aot.compile_layers(compiled, home / "compiled", progress=False)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    valid = (ids != 0) | (torch.arange(2)[:, None] == 1)
    caches = [m.new_cache(2) for m in (model, compiled)]
    with torch.inference_mode():
        for m, cache in zip((model, compiled), caches, strict=True):
            m(ids, cache, valid)
        prompt = program.calls  # the prompt's 10 rows run on it where the packed weights take them
        for step in range(4):
            x = torch.tensor([[13 + step], [20 + 3 * step]])
            reference, ours = (m(x, cache, torch.ones(2, 1, dtype=torch.bool))
                               for m, cache in zip((model, compiled), caches, strict=True))
            assert close(ours, reference), (step, (ours - reference).abs().max(), reference.abs().max())
    assert program.calls - prompt == 2 * 4
    x = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    for position in (3, 60, 3):
        rope = compiled._rope(torch.tensor([position]), torch.bfloat16)
        _, cos, sin, mask = program._pass_inputs(x, rope, None, 5)
        assert torch.equal(cos[0, 0], rope[0]) and torch.equal(sin[0, 0], rope[1]) and mask is None
    keep = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    for mask in (keep, keep.logical_not(), keep):  # the same positions, other masks
        assert torch.equal(program._pass_inputs(x, rope, mask, 5)[3], mask.expand(1, 1, program.groups, 5))


def test_a_servers_large_batches_run_the_dense_program_close_to_the_eager_layers(home):
    """`compile_layers(..., dense=True)` (`canvaslm serve`): passes past the packed kernels' rows run the program on
    the dense weights, AR steps of one query in many rows (its matmul attention, with and without padded rows) and
    commits, with logits close to the eager dense layers'; the packed program does not take them."""
    rows = max(p.max_rows for p in packed_weights(packed_model())) + 4
    for padded in (True, False):
        model, compiled = packed_model(), packed_model()
        aot.compile_layers(compiled, home / "compiled", progress=False, dense=True)
        torch.manual_seed(0)
        ids = torch.randint(3, 70, (rows, 6))
        if padded:
            ids[0, :2] = 0
        caches = [m.new_cache(rows) for m in (model, compiled)]
        with torch.inference_mode():
            for m, cache in zip((model, compiled), caches, strict=True):
                m(ids, cache, ids != 0)
            for step in range(3):
                x = torch.randint(3, 70, (rows, 1 if step < 2 else 4))
                reference, ours = (m(x, cache, torch.ones_like(x, dtype=torch.bool))
                                   for m, cache in zip((model, compiled), caches, strict=True))
                assert close(ours, reference), (padded, step, (ours - reference).abs().max(), reference.abs().max())
        # the prompt (an empty cache), two AR steps and a commit
        assert compiled.dense_layer_program.calls == 2 * 4 and compiled.layer_program.calls == 0


def test_a_model_loaded_for_serving_binds_the_dense_program_too(home, tiny_model_dir, monkeypatch):
    import canvaslm

    monkeypatch.setenv("CANVASLM_HOME", str(home))
    monkeypatch.delenv("CANVASLM_COMPILE_LAYERS")
    # where the dense program overtakes the packed one sooner (`packed_max_rows(..., dense_program=True)`), the
    # causal pass's packed weights of a served model stop there; a model for chat and generate keeps the eager rows
    monkeypatch.setattr(aot, "packed_max_rows", lambda mode, dense_program=False: 3 if dense_program else 99)
    served = canvaslm.load(tiny_model_dir, dtype=torch.bfloat16, quantize="int4", compile="auto", large_batches=True)
    assert served.compiled == "layers" and served.network.dense_layer_program.kind == "dense"
    assert all(w.max_rows == 3 for w in served.network._bind_packed().guards)
    with torch.inference_mode():
        cache = served.network.new_cache(1)
        served.network(torch.tensor([[5, 6, 7, 8, 9]]), cache, torch.ones(1, 5, dtype=torch.bool))
        served.network(torch.tensor([[10, 11, 12, 13]]), cache, torch.ones(1, 4, dtype=torch.bool))
    # the prompt of 5 rows (an empty cache) and the commit of 4, both past the lowered rows
    assert served.network.dense_layer_program.calls == 2 * 2 and served.network.layer_program.calls == 0
    lm = canvaslm.load(tiny_model_dir, dtype=torch.bfloat16, quantize="int4", compile="auto")
    assert lm.compiled == "layers" and lm.network.dense_layer_program is None  # chat and generate: not built
    assert all(w.max_rows == eager_max_rows(w.mode) for w in lm.network._bind_packed().guards)
