"""Llama / Qwen2 / Mistral against transformers on tiny random models, plus the diffusion mode and strict loading."""

from __future__ import annotations


import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from canvaslm.errors import CheckpointError, GenerationError
from canvaslm.models.llama import Config, Model, rope_inv_freq

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2, bos_token_id=1)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
HF_CONFIGS = {
    "llama3-bias": lambda: LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True),
    "llama-tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "qwen2-sliding": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "mistral-sliding": lambda: MistralConfig(**COMMON, sliding_window=4),
}
HF_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM}



def tiny_pair(name: str, seed: int = 0) -> tuple[torch.nn.Module, Model]:
    """A random transformers model (norms and biases randomised too) and ours loaded from its tensors."""
    torch.manual_seed(seed)
    hf_config = HF_CONFIGS[name]()
    hf = HF_CLASSES[hf_config.model_type](hf_config).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "norm" in pname:
                p.normal_(1.0, 0.3)
            elif pname.endswith("bias"):
                p.normal_(0.0, 0.1)
    with torch.device("meta"):
        ours = Model(Config.from_hf(hf_config.to_dict(), name))
    return hf, ours.load_hf_tensors(hf.state_dict(), name).eval()


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts [B, L] left-padded with token 0, and valid [B, L]."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    valid = torch.arange(width)[None, :] >= torch.tensor([width - n for n in lengths])[:, None]
    return ids.masked_fill(~valid, 0), valid


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def pair(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, Model]:
    return tiny_pair(request.param)


@torch.no_grad()
def test_logits_match_transformers_left_padded(pair: tuple[torch.nn.Module, Model]) -> None:
    hf, ours = pair
    lengths = [11, 7, 3]
    ids, valid = left_padded(lengths)
    logits = ours(ids, ours.new_cache(len(lengths)), valid)
    assert logits.dtype == torch.float32 and logits.shape == (3, ids.shape[1], VOCAB)
    for row, n in enumerate(lengths):  # each row alone and unpadded in transformers
        ref = hf(ids[row:row + 1, -n:]).logits[0]
        torch.testing.assert_close(logits[row, -n:], ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_cache_chunks_equal_one_pass(pair: tuple[torch.nn.Module, Model]) -> None:
    _, ours = pair
    ids, valid = left_padded([12, 9])
    whole = ours(ids, ours.new_cache(2), valid)
    cache = ours.new_cache(2)
    chunks = [ours(ids[:, a:b], cache, valid[:, a:b]) for a, b in [(0, 5), (5, 6), (6, 12)]]  # past the window
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(chunks, dim=1)[valid], whole[valid], atol=1e-5, rtol=0)


def test_config_round_trip_and_transformers_reads_it(pair: tuple[torch.nn.Module, Model]) -> None:
    hf, ours = pair
    d = ours.config.to_hf()
    assert d["architectures"] == [type(hf).__name__]
    assert Config.from_hf(d, "x") == ours.config
    reread = type(hf.config)(**{k: v for k, v in d.items() if k != "architectures"})
    assert Config.from_hf(reread.to_dict(), "x") == ours.config


def test_legacy_rope_scaling_matches_transformers() -> None:
    legacy = dict(COMMON, rope_theta=5000.0, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0})
    config = Config.from_hf(legacy, "legacy.json")
    assert config.rope_type == "llama3" and config.rope_scaling["original_max_position_embeddings"] == 256
    reference = LlamaForCausalLM(LlamaConfig(**legacy)).model.rotary_emb.inv_freq
    torch.testing.assert_close(rope_inv_freq(config), reference, atol=0, rtol=0)


@pytest.mark.parametrize("change, field", [
    ({"hidden_size": None}, "hidden_size"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    ({"tie_word_embeddings": 1}, "tie_word_embeddings"),
    ({"eos_token_id": [2, "x"]}, "eos_token_id"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "rope_parameters.low_freq_factor"),
])
def test_bad_config_names_the_field(change: dict, field: str) -> None:
    d = {**COMMON, "model_type": "llama", **change}
    with pytest.raises(CheckpointError) as err:
        Config.from_hf({k: v for k, v in d.items() if v is not None}, "cfg.json")
    assert err.value.field == field and "cfg.json" in str(err.value)


def test_bad_tensors_name_the_tensor() -> None:
    hf, ours = tiny_pair("llama3-bias")
    good = hf.state_dict()
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"},
                    "model.layers.1.mlp.up_proj.weight"),
        "extra": ({**good, "model.layers.2.mlp.up_proj.weight": torch.zeros(1)}, "model.layers.2.mlp.up_proj.weight"),
        "shape": ({**good, "model.norm.weight": torch.ones(65)}, "model.norm.weight"),
    }
    for problem, (tensors, name) in cases.items():
        with torch.device("meta"):
            fresh = Model(ours.config)
        with pytest.raises(CheckpointError) as err:
            fresh.load_hf_tensors(tensors, "w.safetensors")
        assert err.value.field == name, problem
    assert "expected (64,)" in str(err.value) and "found (65,)" in str(err.value)


def test_hf_tensors_round_trip() -> None:
    _, ours = tiny_pair("llama-tied")
    tensors = ours.hf_tensors()
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    ours.to_diffusion(8)
    tensors = ours.hf_tensors()
    assert {f"model.self_conditioning.{n}.weight" for n in ("pre_norm", "gate_proj", "up_proj", "down_proj")} <= set(
        tensors)
    with torch.device("meta"):
        again = Model(Config.from_hf(ours.config.to_hf(), "x"))
    again.load_hf_tensors(tensors, "x")
    assert again.kind == "diffusion" and again.canvas_length == 8
    assert all(torch.equal(again.hf_tensors()[k], v) for k, v in tensors.items())


# -- diffusion mode ----------------------------------------------------------------------------------------------

@pytest.fixture
def diffusion() -> Model:
    _, ours = tiny_pair("mistral-sliding")  # sliding windows make cache reads the harder case
    assert ours.kind == "autoregressive" and ours.canvas_length is None
    with pytest.raises(GenerationError):
        ours.decode(torch.zeros(1, 4, dtype=torch.long), ours.new_cache(1), None)
    return ours.to_diffusion(6)


@torch.no_grad()
def test_decode_is_bidirectional_and_reads_only(diffusion: Model) -> None:
    ids, valid = left_padded([9, 5])
    cache = diffusion.new_cache(2)
    hidden = diffusion.encode(ids, cache, valid)
    assert hidden.shape == (2, 9, 64)
    snapshot = [(k.clone(), v.clone()) for k, v in zip(cache.keys, cache.values)]
    valid_before = cache.valid.clone()
    canvas = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    logits = diffusion.decode(canvas, cache, None)
    assert logits.shape == (2, 6, VOCAB) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert cache.length == 9 and torch.equal(cache.valid, valid_before)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k0, v0), k, v in zip(snapshot, cache.keys, cache.values))
    changed = canvas.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    later = diffusion.decode(changed, cache, None)
    assert (later[:, 0] - logits[:, 0]).abs().max() > 1e-4  # the first position saw the last one


@torch.no_grad()
def test_decode_of_fresh_block_needs_no_signal_and_learns_one(diffusion: Model) -> None:
    ids, valid = left_padded([7, 4])
    cache = diffusion.new_cache(2)
    diffusion.encode(ids, cache, valid)
    canvas = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    sc_logits = torch.randn(2, 6, VOCAB, generator=torch.Generator().manual_seed(4))
    runs = []
    diffusion.self_conditioning.register_forward_hook(lambda *_: runs.append(1))
    plain = diffusion.decode(canvas, cache, None)
    torch.testing.assert_close(diffusion.decode(canvas, cache, sc_logits), plain, atol=0, rtol=0)  # zero down_proj
    assert not runs  # an untrained block adds exactly nothing, so inference skips it
    with torch.enable_grad():  # training runs it: its zero down_proj learns from that pass
        diffusion.decode(canvas, cache, sc_logits).sum().backward()
    assert runs and diffusion.self_conditioning.down_proj.weight.grad.abs().max() > 0
    torch.nn.init.normal_(diffusion.self_conditioning.down_proj.weight, std=0.1)  # a trained block is read
    assert (diffusion.decode(canvas, cache, sc_logits) - plain).abs().max() > 1e-3
    torch.testing.assert_close(diffusion.decode(canvas, cache, None), plain, atol=0, rtol=0)


@torch.no_grad()
def test_diffusion_model_keeps_the_ar_forward(diffusion: Model) -> None:
    _, ar = tiny_pair("mistral-sliding")
    ids, valid = left_padded([8, 8])
    torch.testing.assert_close(diffusion(ids, diffusion.new_cache(2), valid), ar(ids, ar.new_cache(2), valid),
                               atol=0, rtol=0)
    assert diffusion.config.to_hf()["architectures"] == ["LlamaForBlockDiffusion"]
    assert diffusion.config.to_hf()["canvas_length"] == 6


# -- grid canvases (Sudoku) ----------------------------------------------------------------------------------------

GRID = {**COMMON, "model_type": "llama", "canvas_length": 16, "canvas_grid": [4, 4, 2, 2]}


def test_grid_config_round_trips_and_bad_grids_name_the_field() -> None:
    config = Config.from_hf(GRID, "cfg.json")
    assert config.canvas_grid == [4, 4, 2, 2] and Config.from_hf(config.to_hf(), "again") == config
    for bad in ([4, 4, 3, 2], [4, 4, 2], [4, 4, 0, 2], [2, 4, 2, 2], ["4", 4, 2, 2]):
        with pytest.raises(CheckpointError) as err:
            Config.from_hf({**GRID, "canvas_grid": bad}, "cfg.json")
        assert err.value.field == "canvas_grid" and "cfg.json" in str(err.value)
    with pytest.raises(CheckpointError):  # a grid needs a canvas of rows x cols cells
        Config.from_hf({**GRID, "canvas_length": None}, "cfg.json")


def test_grid_embedding_is_row_plus_column_plus_box() -> None:
    torch.manual_seed(0)
    grid = Model(Config.from_hf(GRID, "x")).canvas_grid
    table = grid()
    assert table.shape == (16, 64)
    for cell, (row, col, box) in {0: (0, 0, 0), 3: (0, 3, 1), 9: (2, 1, 2), 15: (3, 3, 3)}.items():
        torch.testing.assert_close(table[cell], grid.row.weight[row] + grid.col.weight[col] + grid.box.weight[box])


@pytest.mark.parametrize("attention", [False, True])
@torch.no_grad()
def test_grid_model_decode_reads_positions_and_matches_training_pass(attention: bool) -> None:
    torch.manual_seed(0)
    model = Model(Config.from_hf({**GRID, "canvas_grid_attention": attention}, "x")).eval()
    assert (model.canvas_grid.relation_bias is not None) == attention == model.config.to_hf().get(
        "canvas_grid_attention", False)
    if attention:  # random biases: a zero bias would pass the checks below without being applied
        torch.nn.init.normal_(model.canvas_grid.relation_bias, std=1.0)
    prompt = torch.tensor([[1, 5, 6]])
    canvas = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(1)
    model.encode(prompt, cache, torch.ones_like(prompt, dtype=torch.bool))
    logits = model.decode(canvas, cache, None)
    # the training pass (clean canvas in the causal pass, noised one decoded) gives the same canvas logits
    ids = torch.cat([prompt, canvas], dim=1)
    _, training = model.forward_block_diffusion(ids, torch.ones_like(ids, dtype=torch.bool), 3, canvas, None)
    torch.testing.assert_close(training, logits, atol=1e-5, rtol=1e-5)
    if attention:  # the relation biases are read: changing them changes the logits
        model.canvas_grid.relation_bias[:, :, 7] += 1.0
        assert (model.decode(canvas, cache, None) - logits).abs().max() > 1e-4
    torch.nn.init.zeros_(model.canvas_grid.box.weight)  # the box table is read: changing it changes the logits
    assert (model.decode(canvas, cache, None) - logits).abs().max() > 1e-4
    tensors = model.hf_tensors()
    assert {f"model.canvas_grid.{n}.weight" for n in ("row", "col", "box")} <= set(tensors)
    with torch.device("meta"):
        again = Model(Config.from_hf(model.config.to_hf(), "x"))
    again.load_hf_tensors(tensors, "x")
    torch.testing.assert_close(again.decode(canvas, cache, None), model.decode(canvas, cache, None), atol=0, rtol=0)


def test_grid_relation_bias_sits_on_the_right_cell_pairs() -> None:
    torch.manual_seed(0)
    grid = Model(Config.from_hf({**GRID, "canvas_grid_attention": True}, "x")).canvas_grid
    torch.nn.init.normal_(grid.relation_bias)
    keys = 3 + 16  # three cached positions, then the 4 x 4 canvas
    mask = torch.ones(2, 1, 16, keys, dtype=torch.bool)
    mask[1, :, :, 0] = False  # row 1's first cached position is padding
    bias = grid.attention_bias(1, mask, 16, keys, torch.float32)
    assert bias.shape == (2, 4, 16, keys) and torch.isinf(bias[1, :, :, 0]).all() and (bias[:, :, :, 1:3] == 0).all()
    # 4 x 4 grid of 2 x 2 boxes: code = 4 * same row + 2 * same column + same box
    for (a, b), code in {(0, 0): 7, (0, 1): 5, (0, 2): 4, (0, 4): 3, (0, 8): 2, (0, 5): 1, (0, 15): 0}.items():
        torch.testing.assert_close(bias[0, :, a, 3 + b], grid.relation_bias[1, :, code])


@torch.no_grad()
def test_a_deepened_model_computes_the_same_until_trained_and_its_copies_learn() -> None:
    torch.manual_seed(0)
    model = Model(Config.from_hf({**GRID, "canvas_grid_attention": True}, "x")).eval()
    torch.nn.init.normal_(model.canvas_grid.relation_bias, std=1.0)
    torch.nn.init.normal_(model.self_conditioning.down_proj.weight, std=0.02)
    deeper = model.deepened(3 * model.config.num_hidden_layers).eval()
    assert deeper.config.num_hidden_layers == 3 * model.config.num_hidden_layers == len(deeper.layers)
    assert deeper.canvas_grid.relation_bias.shape[0] == len(deeper.layers)
    prompt, canvas = torch.tensor([[1, 5, 6]]), torch.randint(3, VOCAB, (1, 16))
    previous = torch.randn(1, 16, VOCAB)
    outputs = []
    for m in (model, deeper):
        cache = m.new_cache(1)
        causal = m.encode(prompt, cache, torch.ones_like(prompt, dtype=torch.bool))
        outputs.append((causal, m.decode(canvas, cache, previous)))
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    copy = deeper.layers[1]  # a copy: the source's features, output projections at zero
    torch.testing.assert_close(copy.self_attn.q_proj.weight, model.layers[0].self_attn.q_proj.weight)
    assert not copy.self_attn.o_proj.weight.any() and not copy.mlp.down_proj.weight.any()
    with torch.enable_grad():  # the copies receive gradients (through their zero output projections first)
        cache = deeper.new_cache(1)
        deeper.encode(prompt, cache, torch.ones_like(prompt, dtype=torch.bool))
        deeper.decode(canvas, cache, None).logsumexp(-1).sum().backward()
    assert copy.self_attn.o_proj.weight.grad.abs().sum() > 0 and copy.mlp.down_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple"):
        model.deepened(model.config.num_hidden_layers + 1)
