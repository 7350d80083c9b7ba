"""`load(..., compile=True)`: the causal pass, and a Llama's canvas pass, run through torch.compile and write what the
eager passes write."""

from __future__ import annotations

import copy
import dataclasses

import torch

import canvaslm
from canvaslm.engine.ar import ar_generate
from canvaslm.models import llama
from canvaslm.models.lora import LoRALinear, apply_lora, cache_canvas_weights
from tests.train.toy_config import MODEL_INIT


@torch.inference_mode()
def test_a_compiled_causal_pass_decodes_the_eager_tokens(tmp_path):
    # a tiny Llama, the default model's architecture: a mixture-of-experts model (diffusion_gemma) compiles the same
    # way but breaks its graph at every expert, which cost ~2.5x the compile time on a 2-core CPU (~5 minutes cold)
    torch.manual_seed(0)
    network = llama.Model(llama.Config.from_hf({"model_type": "llama", **MODEL_INIT}, "test"))
    canvaslm.LM(network.eval(), None, "ar", {"eos_token_id": 1, "pad_token_id": 0}).save(tmp_path)
    eager, compiled = canvaslm.load(tmp_path), canvaslm.load(tmp_path, compile=True)
    assert compiled.compiled and not eager.compiled
    assert type(compiled.network.encode).__name__ != "method"  # the compiled wrapper, not the bound method
    ids = torch.randint(3, eager.network.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(ids, dtype=torch.bool)
    runs = [ar_generate(lm.network, ids, valid, 12, temperature=0.0, eos_token_ids=[]) for lm in (eager, compiled)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)


@torch.inference_mode()
def test_a_compiled_canvas_pass_is_one_graph_and_writes_the_eager_canvases(tmp_path):
    # the canvas pass's layers compile too (Llama): eager mode's per-op overhead was ~25% of a 4-token canvas pass on
    # a 2-core EPYC (67 -> 51 ms). A data-dependent branch inside them (whether the cache holds padding) once broke
    # the graph at every layer, and torch.compile fell back to eager, slower than never compiling (76 ms)
    torch.manual_seed(0)
    config = llama.Config.from_hf({"model_type": "llama", **MODEL_INIT, "eos_token_id": 1, "pad_token_id": 0},
                                  "test")
    network = llama.Model(config).to_diffusion(4).eval()
    adapted = copy.deepcopy(network)  # canvas-only adapters, as the default model has: on in the canvas pass only
    adapted.config = dataclasses.replace(adapted.config, canvas_adapters=True)
    apply_lora(adapted, rank=4, alpha=8.0)
    for module in adapted.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.3)
    cache_canvas_weights(adapted)
    prompts = torch.randint(3, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    valid = torch.ones_like(prompts, dtype=torch.bool)
    valid[1, :3] = False  # a left-padded row: the canvas pass masks the padding
    canvas = torch.randint(3, config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(2))
    for model in (network, adapted):
        for rows in (valid, torch.ones_like(valid)):  # with padding and without (SDPA unmasked)
            cache = model.new_cache(2)
            model.encode(prompts, cache, rows)
            eager = model.decode(canvas, cache, None)
            model.canvas_layers = torch.compile(model.canvas_layers, fullgraph=True, dynamic=True)
            try:  # fullgraph: a graph break is an error, not a silent fall back to eager
                torch.testing.assert_close(model.decode(canvas, cache, None), eager, atol=1e-5, rtol=0)
            finally:
                del model.canvas_layers
    # through `load`: both passes compiled, and a whole decoding writes the eager tokens
    canvaslm.LM(network, None, "test", {"eos_token_id": 1, "pad_token_id": 0}).save(tmp_path)
    eager_lm, compiled_lm = canvaslm.load(tmp_path), canvaslm.load(tmp_path, compile=True)
    assert type(compiled_lm.network.canvas_layers).__name__ != "method"
    runs = [lm.generate([[5, 6, 7], [8, 9, 10, 11, 12]], max_new_tokens=12, seed=0).sequences
            for lm in (eager_lm, compiled_lm)]
    assert torch.equal(runs[0], runs[1])
