"""`load(..., compile=True)`: the causal pass runs through torch.compile and writes what the eager pass writes."""

from __future__ import annotations

import torch

import canvaslm
from canvaslm.engine.ar import ar_generate
from canvaslm.models import llama
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
