"""The Sudoku training tasks on tiny models: the diffusion batch noises and scores only blanks (the givens sit
fixed in the canvas), and both tasks train, evaluate (solve rate, forward passes) and export a model that
`canvaslm sudoku` can load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import canvaslm
from canvaslm.sudoku import board as sudoku
from canvaslm.sudoku.solver import DECODING, solve
from canvaslm.train.config import ConfigError, load_config
from canvaslm.train.tasks import make_task
from canvaslm.train.trainer import build_model, train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sudoku"
TINY = ["model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_hidden_layers=1",
        "data.pool={easy = 6}", 'data.held_out="easy"', "optim.max_steps=2", "optim.batch_size=4",
        "optim.warmup_steps=1", "train.eval_every=2", "train.save_every=2", "eval.examples=3",
        "eval.sample_examples=3"]


def test_diffusion_batch_noises_and_scores_only_blank_cells(tmp_path):
    config = load_config(EXAMPLES / "diffusion.toml", TINY + [f"train.out_dir={tmp_path}"])
    task = make_task(config)
    batch = task.batch(0, 0, torch.Generator().manual_seed(0))
    blanks = batch.input_ids[:, 1:82] == sudoku.BLANK  # the prompt's cells (after BOS)
    assert torch.equal(batch.supervised, blanks) and 0 < int(blanks.sum()) < blanks.numel()


@pytest.mark.parametrize("name", ["diffusion", "ar", "grid", "ar-5m"])
def test_every_task_trains_evaluates_and_exports_a_solver(tmp_path, name):
    config = load_config(EXAMPLES / f"{name}.toml", TINY + [f"train.out_dir={tmp_path}"])
    result = train(config, make_task(config))
    assert 0 <= result["eval_solve_rate"] <= 1 and result["eval_forward_passes"] >= 1
    lm = canvaslm.load(tmp_path / "model")
    puzzle, _ = next(sudoku.puzzles("easy", 1, 3))
    answer = solve(lm, [sudoku.parse(puzzle)])[0]
    # an untrained model solves nothing, but every given is kept in place
    assert all(a == c for a, c in zip(answer.solution, puzzle) if c not in ".0")
    if lm.kind == "diffusion":  # the exported model decodes as the solver's DECODING says unless told otherwise
        assert {k: getattr(lm.diffusion_defaults, k) for k in DECODING} == DECODING


def test_grid_loss_scores_masked_blanks_only(tmp_path):
    """A grid model's loss reads no prompt (the givens are in the canvas) and scores only masked blanks."""
    import dataclasses

    from canvaslm.train.sudoku_tasks import grid_loss
    from canvaslm.train.trainer import build_model

    config = load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}"])
    task, model = make_task(config), build_model(config.model)
    batch = task.batch(0, 0, torch.Generator().manual_seed(0))
    loss, metrics = grid_loss(model, batch, sudoku.MASK, torch.Generator().manual_seed(1))
    assert loss.requires_grad and 0 < metrics["mean_t"] < 1
    other = batch.input_ids.clone()
    other[:, 1:82] = sudoku.BLANK                         # a different prompt: not read
    again, _ = grid_loss(model, dataclasses.replace(batch, input_ids=other), sudoku.MASK,
                         torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, loss, atol=0, rtol=0)
    none, _ = grid_loss(model, dataclasses.replace(batch, supervised=torch.zeros_like(batch.supervised)),
                        sudoku.MASK, torch.Generator().manual_seed(1))
    assert none.item() == 0.0  # nothing to score without blanks


def test_grid_model_solves_from_bos_alone(tmp_path):
    from canvaslm.engine.lm import LM
    from canvaslm.sudoku.solver import is_grid_model
    from canvaslm.train.trainer import build_model

    config = load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}"])
    lm = LM(build_model(config.model).eval(), sudoku.tokenizer(), "tiny grid model")
    assert is_grid_model(lm) and sudoku.prompt_ids("." * 81, grid=True) == [sudoku.BOS]
    puzzle, _ = next(sudoku.puzzles("easy", 1, 5))
    lm.network.config.mask_token_id = sudoku.MASK
    answer = solve(lm, [sudoku.parse(puzzle)])[0]
    assert len(answer.solution) == 81 and all(a == c for a, c in zip(answer.solution, puzzle) if c not in ".0")


def test_an_untrained_self_conditioning_block_adds_nothing(tmp_path):
    """A grid model is built in diffusion mode; trained without self-conditioning, its block never learns, yet
    sampling feeds it the previous step's logits from the second pass on: it must be an exact identity (a random
    one cost the session-7 model 22 points of hard puzzles)."""
    from canvaslm.train.trainer import build_model

    config = load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}"])
    model = build_model(config.model).eval()
    assert not bool(model.self_conditioning.down_proj.weight.any())
    canvas = torch.randint(3, 14, (2, 81))
    cache = model.new_cache(2, torch.device("cpu"))
    bos = torch.full((2, 1), sudoku.BOS)
    model.encode(bos, cache, torch.ones_like(bos, dtype=torch.bool))
    previous = torch.randn(2, 81, model.vocab_size)
    torch.testing.assert_close(model.decode(canvas, cache, previous), model.decode(canvas, cache, None),
                               atol=0, rtol=0)


def _record_canvases(model):
    """Make `model.decode` append a copy of every canvas it reads to the returned list; also returns the original
    decode."""
    seen, decode = [], model.decode
    model.decode = lambda canvas, cache, sc, rows=None: seen.append(canvas.clone()) or decode(canvas, cache, sc, rows)
    return seen, decode


def test_grid_loss_with_revision_shows_wrong_digits_and_scores_every_blank(tmp_path):
    """revision_p: some unmasked blanks read a wrong digit (never their own, never on a given), and every blank
    is scored, so the model learns to correct what it reads."""
    from canvaslm.train.sudoku_tasks import grid_loss
    from canvaslm.train.trainer import build_model

    config = load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}", "optim.batch_size=64"])
    task, model = make_task(config), build_model(config.model)
    batch = task.batch(0, 0, torch.Generator().manual_seed(0))
    seen, decode = _record_canvases(model)
    clean, blanks = batch.input_ids[:, batch.prompt_length:], batch.supervised
    _, plain = grid_loss(model, batch, sudoku.MASK, torch.Generator().manual_seed(1))
    assert "corrected" not in plain and bool(((seen[0] == clean) | (seen[0] == sudoku.MASK)).all())
    loss, metrics = grid_loss(model, batch, sudoku.MASK, torch.Generator().manual_seed(1), revision_p=0.3)
    noised = seen[1]
    wrong = (noised != clean) & (noised != sudoku.MASK)
    assert loss.requires_grad and 0 <= metrics["corrected"] <= 1
    assert bool((wrong <= blanks).all()) and bool(torch.isin(noised[wrong], torch.tensor(sudoku.DIGIT_IDS)).all())
    shown = blanks & (noised != sudoku.MASK)
    assert 0.2 < wrong.sum() / shown.sum() < 0.4  # about revision_p of the blanks left unmasked


def test_grid_loss_with_hard_masks_masks_the_blanks_the_model_is_least_sure_of(tmp_path):
    """hard_masks_p = 1: each puzzle keeps the number of masked blanks random masking drew, but they are the blanks
    whose top probability on the empty grid is lowest (a random subset of that size fails this)."""
    from canvaslm.train.sudoku_tasks import grid_loss

    config = load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}", "optim.batch_size=16"])
    task, model = make_task(config), build_model(config.model)
    batch = task.batch(0, 0, torch.Generator().manual_seed(0))
    seen, decode = _record_canvases(model)
    clean, blanks = batch.input_ids[:, batch.prompt_length:], batch.supervised
    grid_loss(model, batch, sudoku.MASK, torch.Generator().manual_seed(1))
    random_masks = seen.pop() == sudoku.MASK
    loss, _ = grid_loss(model, batch, sudoku.MASK, torch.Generator().manual_seed(1), hard_masks_p=1.0)
    empty, noised = seen[-2], seen[-1]
    assert torch.equal(empty == sudoku.MASK, blanks) and loss.requires_grad
    hard = noised == sudoku.MASK
    assert torch.equal(hard.sum(1), random_masks.sum(1)) and not torch.equal(hard, random_masks)
    assert bool((hard <= blanks).all()) and torch.equal(noised[~hard], clean[~hard])  # shown blanks: their digit
    with torch.no_grad():
        cache = model.new_cache(len(clean), clean.device)
        model.encode(torch.full((len(clean), 1), sudoku.BOS), cache, torch.ones(len(clean), 1, dtype=torch.bool))
        sure = decode(empty, cache, None).softmax(-1).amax(-1)
    for row in range(len(clean)):
        shown = blanks[row] & ~hard[row]
        if hard[row].any() and shown.any():
            assert sure[row][hard[row]].max() <= sure[row][shown].min()

    # through the task: training draws hard masks (a pass on the empty grid first); the held-out loss does not
    hard_task = make_task(load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}",
                                                                       "data.hard_masks_p=1.0"]))
    for training, passes in ((True, 2), (False, 1)):
        seen.clear()
        model.train(training)
        hard_task.loss(model, batch, torch.Generator().manual_seed(1))
        assert len(seen) == passes

    config = load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}", "data.hard_masks_p=2"])
    with pytest.raises(ConfigError, match="data.hard_masks_p"):
        make_task(config)


def test_hard_masks_replayed_over_passes_reach_the_canvases_where_decoding_gets_stuck(tmp_path):
    """With more passes, a blank the model becomes sure of once another blank is shown is reached before one it is
    never sure of, though it was the less sure of the two on the empty grid; one pass ranks by the empty grid."""
    from canvaslm.train.sudoku_tasks import hardest_blanks

    class Toy:  # cell 1: sure at once; cell 0: 0.5, sure once cell 1 shows its digit; cell 2: 0.9, never sure
        seen: list[torch.Tensor] = []

        def new_cache(self, batch_size, device):
            return None

        def encode(self, input_ids, cache, valid):
            return None

        def decode(self, canvas, cache, self_conditioning_logits):
            self.seen.append(canvas.clone())
            sure = torch.full(canvas.shape, 0.9)
            sure[:, 1] = 1.0
            sure[:, 0] = torch.where(canvas[:, 1] == sudoku.MASK, 0.5, 1.0)
            probs = torch.zeros(*canvas.shape, 14) + ((1 - sure) / 13)[..., None]
            probs[..., sudoku.DIGIT_IDS[0]] = sure
            return probs.clamp_min(1e-12).log()

    _, solution = next(sudoku.puzzles("easy", 1, 0))
    clean = torch.tensor([sudoku.encode_solution(solution)])
    blanks = torch.zeros(1, 81, dtype=torch.bool)
    blanks[0, :3] = True
    toy, canvases = Toy(), {}
    for passes, count, expected in ((1, 1, {0}), (2, 1, {2}), (5, 1, {2}), (2, 2, {0, 2}), (1, 3, {0, 1, 2})):
        toy.seen.clear()
        masked = hardest_blanks(toy, clean, blanks, torch.tensor([count]), sudoku.MASK, passes)
        assert set(masked[0].nonzero().squeeze(1).tolist()) == expected, (passes, count)
        canvases[passes] = list(toy.seen)
    assert len(canvases[5]) == 3  # 5 passes asked: the third shows nothing new, and the replay stops there
    second, third = canvases[5][1][0], canvases[5][2][0]  # shown blanks hold their true digit, givens stay
    assert torch.equal(second[3:], clean[0, 3:]) and int(second[1]) == int(clean[0, 1])
    assert int(second[0]) == int(second[2]) == int(third[2]) == sudoku.MASK and int(third[0]) == int(clean[0, 0])

    config = load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}", "data.hard_masks_passes=0"])
    with pytest.raises(ConfigError, match="data.hard_masks_passes"):
        make_task(config)


def test_a_model_trained_to_revise_decodes_with_revision_and_a_bad_revision_p_names_the_field(tmp_path):
    from canvaslm.sudoku.solver import REVISING
    from canvaslm.train.config import ConfigError

    plain = make_task(load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}"]))
    revising = make_task(load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}",
                                                                      "data.revision_p=0.1"]))
    assert plain.generation_defaults == DECODING and revising.generation_defaults == REVISING
    assert REVISING["revise_probability"] > 0 and "revise_probability" not in DECODING

    config = load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}", "data.revision_p=1.5"])
    with pytest.raises(ConfigError, match="data.revision_p"):
        make_task(config)


def test_grid_deep_config_continues_the_bundled_model_deeper(tmp_path):
    from safetensors.torch import load_file

    from canvaslm.loading.registry import resolve

    overrides = ["data.pool={easy = 6}", 'data.held_out="easy"', "optim.max_steps=1", "optim.batch_size=4",
                 "optim.warmup_steps=1", "train.eval_every=1", "train.save_every=1", "eval.examples=3",
                 "eval.sample_examples=3", f"train.out_dir={tmp_path}"]
    bundled_layers = canvaslm.load("sudoku").network.config.num_hidden_layers
    config = load_config(EXAMPLES / "grid-deep.toml", overrides + [f"model.deepen_to={2 * bundled_layers}"])
    train(config, make_task(config))
    bundled = load_file(resolve("sudoku") / "model.safetensors")
    trained = load_file(tmp_path / "model" / "model.safetensors")
    lm = canvaslm.load(tmp_path / "model")
    assert lm.network.config.num_hidden_layers == 2 * bundled_layers and lm.network.config.canvas_grid == [9, 9, 3, 3]
    source, copy = "model.layers.1.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"
    torch.testing.assert_close(trained[copy].float(), bundled[source].float(), atol=0.02, rtol=0)
    assert trained["model.layers.3.mlp.down_proj.weight"].any()  # a copy's silent projection started to learn
    with pytest.raises(ConfigError, match="deepen_to"):
        build_model(load_config(EXAMPLES / "grid-deep.toml", overrides + ["model.deepen_to=15"]).model)


def test_grid_continue_config_trains_the_bundled_model_on_hard_masks(tmp_path):
    overrides = ["data.pool={easy = 6}", 'data.held_out="easy"', "optim.max_steps=1", "optim.batch_size=4",
                 "optim.warmup_steps=1", "train.eval_every=1", "train.save_every=1", "eval.examples=3",
                 "eval.sample_examples=3", f"train.out_dir={tmp_path}"]
    config = load_config(EXAMPLES / "grid-continue.toml", overrides)
    task = make_task(config)
    assert task.sudoku.data.hard_masks_p > 0
    result = train(config, task)
    assert 0 <= result["eval_solve_rate"] <= 1
    bundled = canvaslm.load("sudoku").network.config
    assert canvaslm.load(tmp_path / "model").network.config.num_hidden_layers == bundled.num_hidden_layers


def test_grid_loss_with_self_conditioning_feeds_beliefs_recycled_through_a_chain_of_passes(tmp_path):
    """self_conditioning_p: the trained pass reads, in that share of the puzzles, the beliefs of passes without
    gradients over the same canvases (run on those puzzles only), as sampling feeds them back: shown cells
    certain, digits only. recycle_passes = k: a chain of 1..k such passes, each reading the last one's beliefs."""
    from canvaslm.train.sudoku_tasks import digit_beliefs, grid_loss

    config = load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}", "optim.batch_size=16"])
    task, model = make_task(config), build_model(config.model)
    with torch.no_grad():  # a live block, so that the beliefs a pass reads change what it says
        model.self_conditioning.down_proj.weight.normal_(0, 0.5)
    batch = task.batch(0, 0, torch.Generator().manual_seed(0))
    calls, decode = [], model.decode

    def recording(canvas, cache, sc, rows=None):
        out = decode(canvas, cache, sc, rows)
        calls.append((canvas.clone(), sc, rows, out.detach()))
        return out

    model.decode = recording
    grid_loss(model, batch, sudoku.MASK, torch.Generator().manual_seed(1))
    assert len(calls) == 1 and calls[0][1] is None
    chains = {}
    for passes, seed in [(1, s) for s in range(3)] + [(3, s) for s in range(12)]:
        calls.clear()
        loss, _ = grid_loss(model, batch, sudoku.MASK, torch.Generator().manual_seed(seed), self_conditioning_p=0.5,
                            recycle_passes=passes)
        chains.setdefault(passes, set()).add(len(calls) - 1)
        *chain, (noised, beliefs, rows, _) = calls
        assert loss.requires_grad and not beliefs.requires_grad and 0 < int(rows.sum()) < len(rows)
        picked = rows.nonzero().squeeze(1)
        assert chain[0][1] is None and all(torch.equal(canvas, noised[picked]) for canvas, *_ in chain)
        for (canvas, _, _, out), (_, sc, _, _) in zip(chain, chain[1:]):
            torch.testing.assert_close(sc, digit_beliefs(out, canvas, sudoku.MASK), atol=0, rtol=0)
        torch.testing.assert_close(beliefs[picked], digit_beliefs(chain[-1][3], chain[-1][0], sudoku.MASK),
                                   atol=0, rtol=0)
        canvas, read = noised[picked], beliefs[picked]
        kept, masked = canvas != sudoku.MASK, canvas == sudoku.MASK  # givens and unmasked blanks: certain
        assert bool((read.argmax(-1)[kept] == canvas[kept]).all())
        assert bool((read.softmax(-1).amax(-1)[kept] == 1).all())
        assert torch.allclose(read.softmax(-1)[masked][:, sudoku.DIGIT_IDS].sum(-1), torch.ones(int(masked.sum())))
    assert chains == {1: {1}, 3: {1, 2, 3}}

    bad = load_config(EXAMPLES / "grid.toml", TINY + [f"train.out_dir={tmp_path}", "data.recycle_passes=0"])
    with pytest.raises(ConfigError, match="data.recycle_passes"):
        make_task(bad)
