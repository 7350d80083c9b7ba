"""The continuous-batching engine: a request alone draws exactly what LM.generate draws; requests that join at
different times and share decoder passes get the tokens they get alone; streaming pins what it sent; cancel and
the queue bound work; the AR model goes through the same engine."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

import canvaslm
from canvaslm.diffusion.step import Constraint
from canvaslm.engine.core import Engine, QueueFull
from canvaslm.engine.output import CanvasLogits, Draft, Finished, Tokens
from canvaslm.engine.request import Request
from canvaslm.engine.lm import LM
from canvaslm.models import llama
from canvaslm.models.cache import KVCache
from tests.reference import tiny_checkpoint
from tests.train.toy_config import MODEL_INIT


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> LM:
    path = tmp_path_factory.mktemp("dg")
    tiny_checkpoint(path, canvas_length=8)
    return canvaslm.load(path, device="cpu")


def run(engine: Engine, requests: list[dict], timeout: float = 60) -> list[tuple[list[int], Finished, list]]:
    """Submit all requests, wait for each to finish; returns (tokens, finish event, all events) per request."""
    results = []
    inboxes = []
    for spec in requests:
        inbox: queue.Queue = queue.Queue()
        engine.submit(Request(emit=inbox.put, **spec))
        inboxes.append(inbox)
    for inbox in inboxes:
        results.append(received(inbox, timeout))
    return results


def received(inbox: queue.Queue, timeout: float = 60) -> tuple[list[int], Finished, list]:
    """What one request sent to its inbox until it finished: (tokens, finish event, all events)."""
    events = []
    while not events or not isinstance(events[-1], Finished):
        events.append(inbox.get(timeout=timeout))
    return [t for e in events if isinstance(e, Tokens) for t in e.ids], events[-1], events


PROMPTS = [[2, 10, 11, 12], [2, 20, 21, 22, 23, 24, 25, 26, 27, 28], [2, 30], [2, 40, 41, 42, 43, 44, 45]]


def test_a_request_alone_equals_generate(lm):
    engine = Engine(lm, pin_settled=False).start()
    try:
        for prompt, seed, options in [(PROMPTS[0], 0, {}), (PROMPTS[1], 3, {"entropy_bound": 2.0}),
                                      (PROMPTS[2], 7, {"max_denoising_steps": 5})]:
            expected, reason = lm.decode_new(lm.generate([prompt], 24, seed=seed, **options).sequences[0], len(prompt))
            tokens, finished, _ = run(engine, [dict(prompt=prompt, max_new_tokens=24, seed=seed, sampling=options)])[0]
            assert tokens == expected[:24]
            assert finished.reason == ("stop" if reason == "stop" and len(expected) < 24 else "length")
    finally:
        engine.stop()


def test_the_engine_loop_runs_in_the_calling_thread_until_stopped(lm):
    """`Engine.run` (what `canvaslm serve` does, so that the thread that loaded the model does all the torch work):
    the loop runs in the caller's thread, alive while it runs (from when it calls `started`); requests submitted from
    another thread get what `generate` writes; `stop` from another thread ends it."""
    engine = Engine(lm, pin_settled=False)
    assert not engine.alive
    inbox: queue.Queue = queue.Queue()
    seen = {}

    def client() -> None:
        try:
            engine.submit(Request(PROMPTS[1], 9, inbox.put, seed=3))
            seen["result"] = received(inbox)
            seen["alive"] = engine.alive
        except BaseException as error:  # reported by the test, after the loop ended
            seen["error"] = error
        finally:
            engine.stop()

    engine.run(started=threading.Thread(target=client).start)
    assert "error" not in seen, seen["error"]
    assert not engine.alive and engine.error is None and seen["alive"]
    tokens, finished, _ = seen["result"]
    expected = lm.decode_new(lm.generate([PROMPTS[1]], 9, seed=3).sequences[0], len(PROMPTS[1]))[0][:9]
    assert tokens == expected and finished.reason == "length"


def test_self_conditioning_is_kept_and_stacked_only_for_a_model_that_reads_it(monkeypatch):
    """A model trained without self-conditioning (its block adds exactly nothing, as smol's) gets no logits fed
    back: the engine keeps none and stacks none (50 MB a step at 32 sequences), and still writes what generate
    writes; once the block adds something, every pass after a canvas's first reads the last step's logits."""
    torch.manual_seed(0)
    config = llama.Config.from_hf({"model_type": "llama", **MODEL_INIT, "eos_token_id": 1, "pad_token_id": 0}, "t")
    model = LM(llama.Model(config).to_diffusion(4).eval(), None, "sc")
    fed = []
    decode = model.network.decode

    def spied(canvas_ids, cache, sc=None, rows=None):
        fed.append(sc is not None)
        return decode(canvas_ids, cache, sc, rows)

    monkeypatch.setattr(model.network, "decode", spied)
    for reads in (False, True):
        if reads:
            with torch.no_grad():
                torch.nn.init.normal_(model.network.self_conditioning.down_proj.weight, std=0.2)
        options = {"max_denoising_steps": 4, "confidence_threshold": 1e-9}  # 4 passes a canvas
        expected, _ = model.decode_new(model.generate([PROMPTS[1]], 12, seed=5, **options).sequences[0],
                                       len(PROMPTS[1]))
        fed.clear()
        engine = Engine(model, pin_settled=False).start()
        try:
            tokens, _, _ = run(engine, [dict(prompt=PROMPTS[1], max_new_tokens=12, seed=5, sampling=options)])[0]
        finally:
            engine.stop()
        assert tokens == expected[:12]
        assert fed == ([False, True, True, True] * 3 if reads else [False] * 12), fed


def shift_lm() -> LM:
    """The default model's layout (masked noise, shift, canvas-only adapters) on a tiny random Llama, canvas 4."""
    import dataclasses

    from canvaslm.models.lora import LoRALinear, apply_lora

    torch.manual_seed(0)
    config = llama.Config.from_hf({"model_type": "llama", **MODEL_INIT, "eos_token_id": 1, "pad_token_id": 0}, "t")
    network = llama.Model(config).to_diffusion(4)
    network.config = dataclasses.replace(network.config, canvas_shift=True, mask_token_id=3, canvas_adapters=True)
    apply_lora(network, rank=2, alpha=4.0)
    for name, module in network.named_modules():
        if isinstance(module, LoRALinear) and not name.startswith("self_conditioning"):  # smol reads none
            torch.nn.init.normal_(module.lora_B, std=0.2)
    return LM(network.eval(), None, "shift")


@pytest.mark.parametrize("first_token", ["decoder", "causal"])
def test_a_shift_trained_model_with_canvas_adapters_serves_what_generate_writes(first_token):
    """The default model's layout through the engine: a request alone draws exactly LM.generate's tokens, the
    canvas's first token coming from the last encoded position (read by the first decoder pass, or drawn from the
    causal pass before it: `first_token`)."""
    shifted = shift_lm()
    engine = Engine(shifted, pin_settled=False).start()
    try:
        for prompt, seed in [(PROMPTS[0], 0), (PROMPTS[1], 5)]:
            alone = shifted.generate([prompt], 12, seed=seed, first_token=first_token)
            expected, _ = shifted.decode_new(alone.sequences[0], len(prompt))
            tokens, _, _ = run(engine, [dict(prompt=prompt, max_new_tokens=12, seed=seed,
                                             sampling={"first_token": first_token})])[0]
            assert tokens == expected[:12]
    finally:
        engine.stop()


def alone_and_together(lm: LM, options: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """The first 12 tokens of PROMPTS[i] under options[i] (seed i): each from LM.generate alone, and all from one
    engine that serves them together, every checked one drafting its canvases (`max_draft_batch`)."""
    prompts = PROMPTS[:len(options)]
    alone = [lm.decode_new(lm.generate([p], 12, seed=seed, **o).sequences[0], len(p))[0][:12]
             for seed, (p, o) in enumerate(zip(prompts, options, strict=True))]
    engine = Engine(lm, pin_settled=False, max_draft_batch=len(options)).start()
    try:
        results = run(engine, [dict(prompt=p, max_new_tokens=12, seed=seed, sampling=o)
                               for seed, (p, o) in enumerate(zip(prompts, options, strict=True))])
    finally:
        engine.stop()
    return alone, [tokens for tokens, _, _ in results]


LEFT_TO_RIGHT = dict(order="left_to_right", acceptance="threshold", accept_probability=0.3, sampler="fast",
                     max_denoising_steps=4)


@pytest.mark.parametrize("first_token", ["decoder", "causal"])
def test_steps_that_work_out_only_the_masked_positions_write_what_whole_canvases_write(first_token, monkeypatch):
    """The shipped default's sampler on the default model's layout: the head and the sampler run on the masked
    positions alone (`works_out_open_rows_only`), in LM.generate and in the engine. They write exactly the tokens
    the whole canvas's logits write, with fewer head rows; a request with the reference sampler (which draws over
    every position) shares the engine's batch and still gets its own tokens."""
    import canvaslm.diffusion.generate as loop

    lm, head_rows = shift_lm(), []
    head = lm.network.logits
    monkeypatch.setattr(lm.network, "logits", lambda hidden: head_rows.append(hidden.shape[:-1].numel()) or
                        head(hidden))
    settings = dict(LEFT_TO_RIGHT, first_token=first_token)
    written = {}
    for way in ("masked positions", "whole canvas"):
        if way == "whole canvas":
            monkeypatch.setattr(loop, "works_out_open_rows_only", lambda *args, **kwargs: False)
        head_rows.clear()
        written[way] = [lm.generate([p], 12, seed=seed, **settings).sequences[0].tolist()
                        for seed, p in enumerate(PROMPTS[:3])]
        written[way + " rows"] = sum(head_rows)
    assert written["masked positions"] == written["whole canvas"]
    assert written["masked positions rows"] < 0.7 * written["whole canvas rows"]
    monkeypatch.undo()

    alone, together = alone_and_together(lm, [settings, dict(settings, sampler="reference"), settings])
    assert together == alone


def test_a_smaller_canvas_decodes_as_the_model_trained_on_it_alone_and_in_a_mixed_batch():
    """`canvas_size`: a canvas-4 model asked for canvases of 2 writes exactly what its weights write when 2 is their
    trained canvas, committing every 2 tokens; in the engine a request with canvases of 2 and one with the trained
    canvas take turns in the same steps and each gets its tokens alone; a canvas larger than the trained one is
    refused, naming the limit."""
    import copy
    import dataclasses

    from canvaslm.diffusion.generate import CanvasCommitted
    from canvaslm.errors import GenerationError

    lm = shift_lm()
    settings = dict(LEFT_TO_RIGHT, first_token="causal")
    trained_on_2 = copy.deepcopy(lm)
    trained_on_2.network.config = dataclasses.replace(trained_on_2.network.config, canvas_length=2)
    for seed, prompt in enumerate(PROMPTS[:3]):
        events = list(lm.generate_steps([prompt], 12, seed=seed, canvas_size=2, **settings))
        assert {e.tokens.shape[1] for e in events if isinstance(e, CanvasCommitted)} == {2}
        assert torch.equal(events[-1].sequences,
                           trained_on_2.generate([prompt], 12, seed=seed, **settings).sequences)
    two = dict(settings, canvas_size=2)
    alone, together = alone_and_together(lm, [two, settings, two])
    assert alone[0] != lm.decode_new(lm.generate([PROMPTS[0]], 12, seed=0, **settings).sequences[0],
                                     len(PROMPTS[0]))[0][:12]  # the size changes what is written
    assert together == alone
    with pytest.raises(GenerationError, match="canvas_size must be at most this model's trained canvas of 4"):
        lm.generate([PROMPTS[0]], 12, canvas_size=5)


@pytest.mark.parametrize("pin", [False, True])
def test_batched_requests_get_their_solo_tokens(lm, pin):
    # Batched and solo decoder passes agree to ~1e-5, not bitwise; this random model's self-conditioning loop
    # amplifies that ~3x per step (x1000 by step 6), so the comparison uses short canvases of 3 steps, where
    # the sampled tokens are the same. (Trained models are far less chaotic; no bitwise batch invariance is
    # promised.)
    specs = [dict(prompt=p, max_new_tokens=20, seed=i, sampling={"entropy_bound": 1.0, "max_denoising_steps": 3})
             for i, p in enumerate(PROMPTS)]
    engine = Engine(lm, pin_settled=pin).start()
    try:
        solo = [run(engine, [spec])[0][0] for spec in specs]
        together = [tokens for tokens, _, _ in run(engine, specs)]
    finally:
        engine.stop()
    assert together == solo


def test_canvases_finished_in_one_step_are_committed_in_one_causal_pass_into_the_batch_cache(lm, monkeypatch):
    """Each commit alone is a whole pass over the weights for one canvas: the canvases that finish together go into
    the caches in one pass, written into their rows of the running batch's stacked cache (`KVCache.take` /
    `put`), which is stacked only as requests join; the tokens stay what each request writes alone."""
    specs = [dict(prompt=p, max_new_tokens=16, seed=i,
                  sampling={"entropy_bound": 1.0, "max_denoising_steps": 2 + i % 2})  # canvases end out of step
             for i, p in enumerate(PROMPTS)]
    engine = Engine(lm).start()
    try:
        solo = [run(engine, [spec])[0][0] for spec in specs]
        encode, rows, calls = lm.network.encode, [], {"stack": 0, "put": 0}

        def counted(input_ids, cache, valid):
            rows.append(input_ids.shape[0])
            return encode(input_ids, cache, valid)

        def counting(name, method):
            def call(*args, **kwargs):
                calls[name] += 1
                return method(*args, **kwargs)
            return call

        monkeypatch.setattr(lm.network, "encode", counted)
        monkeypatch.setattr(KVCache, "stack", counting("stack", KVCache.stack))
        monkeypatch.setattr(KVCache, "put", counting("put", KVCache.put))
        together = [tokens for tokens, _, _ in run(engine, specs)]
    finally:
        engine.stop()
    assert together == solo
    # the 4 prompts in one pass (admitted together), then canvases of 2 or 3 steps, begun in one step: several
    # commit in one pass, and steps that commit only some rows write them back in place
    assert rows[0] == 4 and max(rows[1:]) > 1, rows
    assert calls["put"] > 0 and calls["stack"] == 3, calls  # 3 requests joined the first


def test_streaming_pins_settled_tokens_and_drafts_are_opt_in(lm):
    engine = Engine(lm, pin_settled=True).start()
    try:
        spec = dict(prompt=PROMPTS[1], max_new_tokens=32, seed=1, sampling={"entropy_bound": 5.0}, drafts=True)
        tokens, finished, events = run(engine, [spec])[0]
    finally:
        engine.stop()
    drafts = [e for e in events if isinstance(e, Draft)]
    chunks = [e for e in events if isinstance(e, Tokens)]
    assert drafts and all(len(d.ids) == 8 for d in drafts) and drafts[0].step == 1
    assert finished.completion_tokens == len(tokens) <= 32
    # tokens arrive before their canvas is committed: some Tokens event precedes the last draft of canvas 0
    first_chunk = events.index(chunks[0])
    last_draft_of_canvas0 = max(i for i, e in enumerate(events) if isinstance(e, Draft) and e.canvas == 0)
    assert first_chunk < last_draft_of_canvas0
    # every streamed token stays: the committed canvas agrees with what was sent
    assert finished.forward_passes >= 1


def _wait_finished(inbox: queue.Queue) -> Finished:
    while not isinstance(event := inbox.get(timeout=30), Finished):
        pass
    return event


def test_cancel_frees_the_slot_and_the_queue_is_bounded(lm):
    engine = Engine(lm, max_batch=1, max_queue=1, pin_settled=False).start()
    try:
        running, waiting = queue.Queue(), queue.Queue()
        # 48 steps for every 8-token canvas (never confident enough to stop early): runs for seconds
        first = Request(prompt=PROMPTS[0], max_new_tokens=400, emit=running.put,
                        sampling={"entropy_bound": 0.01, "confidence_threshold": 1e-9})
        engine.submit(first)
        while engine.running == 0:
            threading.Event().wait(0.01)
        second = Request(prompt=PROMPTS[1], max_new_tokens=8, emit=waiting.put)
        engine.submit(second)  # waits: max_batch 1
        with pytest.raises(QueueFull):
            engine.submit(Request(prompt=PROMPTS[2], max_new_tokens=8, emit=queue.Queue().put))
        engine.cancel(second.id)
        assert _wait_finished(waiting).reason == "abort"
        engine.cancel(first.id)
        assert _wait_finished(running).reason == "abort"
        assert engine.running == 0 and engine.waiting == 0
        results = run(engine, [dict(prompt=PROMPTS[3], max_new_tokens=8, seed=0)])
        assert results[0][1].reason in ("stop", "length")
    finally:
        engine.stop()
    assert engine.running == 0 and engine.waiting == 0


def test_an_autoregressive_model_runs_through_the_same_engine():
    torch.manual_seed(0)
    network = llama.Model(llama.Config.from_hf({"model_type": "llama", **MODEL_INIT}, "test")).eval()
    lm = LM(network, None, "ar", {"eos_token_id": 1, "pad_token_id": 0})
    prompt = [3, 4, 5, 6]
    expected, _ = lm.decode_new(lm.generate([prompt], 12, seed=5, temperature=0.9).sequences[0], len(prompt))
    engine = Engine(lm).start()
    try:
        tokens, finished, _ = run(engine, [dict(prompt=prompt, max_new_tokens=12, seed=5,
                                                sampling={"temperature": 0.9})])[0]
    finally:
        engine.stop()
    assert tokens == expected[:12] and finished.forward_passes >= len(tokens)


def test_a_constrained_request_writes_only_allowed_tokens_and_equals_generate(lm):
    """One constraint type through the engine: pins and allowed-token masks over the generated region give the
    tokens generate_steps gives under the same Constraint, sharing decoder passes with a free request."""
    vocab, n = lm.network.vocab_size, 12
    allowed = torch.zeros(1, n, vocab, dtype=torch.bool)
    allowed[:, :, 40:48] = True                  # only ids 40..47 anywhere ...
    pins = torch.full((1, n), -1)
    pins[0, 3], pins[0, 9] = 44, 47              # ... and two positions pinned
    constraint = Constraint(pins, allowed)
    options = {"max_denoising_steps": 6}
    *_, out = lm.generate_steps([PROMPTS[1]], n, 2, constraint=constraint, **options)
    expected, _ = lm.decode_new(out.sequences[0], len(PROMPTS[1]))
    engine = Engine(lm, pin_settled=False).start()
    try:
        (tokens, _, _), (free, _, _) = run(engine, [
            dict(prompt=PROMPTS[1], max_new_tokens=n, seed=2, sampling=options, constraint=constraint, ignore_eos=True),
            dict(prompt=PROMPTS[0], max_new_tokens=n, seed=1, sampling=options, ignore_eos=True)])
    finally:
        engine.stop()
    assert tokens == expected[:n] and len(tokens) == n
    assert all(40 <= t < 48 for t in tokens) and tokens[3] == 44 and tokens[9] == 47
    assert not all(40 <= t < 48 for t in free)  # the neighbour in the same passes is not constrained


def test_kept_logits_come_before_each_canvas_and_all_pin_canvases_cost_no_pass(lm):
    """keep_logits hands each denoised canvas's last logits to the caller before its tokens; a canvas that is all
    pins is committed without a decoder pass, as generate_steps does, so both give the same tokens and passes."""
    vocab, n = lm.network.vocab_size, 24                     # canvas 8: canvases 0 and 2 free, canvas 1 all pins
    pins = torch.full((1, n), -1)
    pins[0, 8:16] = torch.arange(60, 68)
    constraint = Constraint(pins, keep_logits=True)
    options = {"max_denoising_steps": 5}
    events = list(lm.generate_steps([PROMPTS[2]], n, 4, constraint=constraint, **options))
    expected, _ = lm.decode_new(events[-1].sequences[0], len(PROMPTS[2]))
    kept = {e.canvas: e.logits for e in events if type(e).__name__ == "CanvasCommitted"}
    engine = Engine(lm).start()
    try:
        tokens, finished, got = run(engine, [dict(prompt=PROMPTS[2], max_new_tokens=n, seed=4, sampling=options,
                                                  constraint=constraint, ignore_eos=True, pin_settled=False)])[0]
    finally:
        engine.stop()
    assert tokens == expected[:n] and tokens[8:16] == list(range(60, 68))
    assert finished.forward_passes == int(events[-1].forward_passes[0])
    logits = [e for e in got if isinstance(e, CanvasLogits)]
    assert [e.canvas for e in logits] == [0, 2] and kept[1] is None  # no pass, no logits for the pinned canvas
    for event in logits:
        assert event.logits.shape == (8, vocab) and torch.allclose(event.logits, kept[event.canvas][0])
        first_tokens_after = got.index(event) + 1
        assert isinstance(got[first_tokens_after], (Tokens, Finished))  # logits, then that canvas's tokens


def test_a_malformed_constraint_or_an_empty_prompt_is_refused_at_submit_and_the_engine_stays_up(lm):
    engine = Engine(lm).start()
    try:
        vocab = lm.network.vocab_size
        for bad, match in [(False, "must be a Constraint"), (Constraint(torch.tensor([[1.5]])), "integer tensor"),
                           (Constraint(torch.tensor([[vocab]])), "token ids"),
                           (Constraint(allowed=torch.ones(1, 3, vocab - 1, dtype=torch.bool)), "bool tensor")]:
            with pytest.raises(canvaslm.errors.GenerationError, match=match):
                engine.submit(Request(prompt=PROMPTS[0], max_new_tokens=4, emit=queue.Queue().put, constraint=bad))
        with pytest.raises(canvaslm.errors.GenerationError, match="prompt must hold at least one token id"):
            engine.submit(Request(prompt=[], max_new_tokens=4, emit=queue.Queue().put))
        tokens, finished, _ = run(engine, [dict(prompt=PROMPTS[0], max_new_tokens=4, seed=0)])[0]
        assert engine.alive and finished.reason in ("stop", "length")
    finally:
        engine.stop()


def test_a_constraint_slices_into_canvases():
    pins = torch.tensor([[-1, 5, -1, -1, 7]])
    allowed = torch.zeros(1, 5, 10, dtype=torch.bool)
    allowed[0, 4, 7] = True
    first, second, third = (Constraint(pins, allowed).for_canvas(i, 4) for i in range(3))
    assert first[0].tolist() == [[-1, 5, -1, -1]] and not bool(first[1].any())
    assert second[0].tolist() == [[7, -1, -1, -1]]  # padded with "free" past the region
    assert second[1][0, 0].nonzero().tolist() == [[7]] and bool(second[1][0, 1:].all())  # past n: any token
    assert third == (None, None)


def test_an_infill_decodes_in_the_trained_canvas_unless_it_asks_for_another():
    """A model whose default canvas is smaller than its trained one (`smol`: 4 of 16) still fills a middle in the
    trained canvas, where the middle can see the suffix: through the engine and `LM.infill`'s options alike; a
    request that names canvas_size gets it."""
    import dataclasses

    lm = shift_lm()
    lm.diffusion_defaults = dataclasses.replace(lm.diffusion_defaults, canvas_size=2, **LEFT_TO_RIGHT)
    assert lm.infill_sampling({}) == {"canvas_size": 0} and lm.infill_sampling({"canvas_size": 2})["canvas_size"] == 2
    engine = Engine(lm, pin_settled=False).start()
    try:
        widths = {}
        for name, sampling in (("default", {}), ("asked", {"canvas_size": 2})):
            spec = dict(prompt=PROMPTS[0], max_new_tokens=6, seed=0, suffix=[7, 8], drafts=True, sampling=sampling)
            _, _, events = run(engine, [spec])[0]
            widths[name] = {len(e.ids) for e in events if isinstance(e, Draft)}
        plain = dict(prompt=PROMPTS[0], max_new_tokens=6, seed=0, drafts=True)
        widths["no suffix"] = {len(e.ids) for e in run(engine, [plain])[0][2] if isinstance(e, Draft)}
    finally:
        engine.stop()
    assert widths == {"default": {4}, "asked": {2}, "no suffix": {2}}


def test_infill_holds_the_suffix_fixed_after_the_middle(lm):
    engine = Engine(lm, pin_settled=False).start()
    try:
        spec = dict(prompt=PROMPTS[0], max_new_tokens=5, seed=0, suffix=[50, 51, 52, 53, 54], drafts=True,
                    sampling={"max_denoising_steps": 6})
        tokens, finished, events = run(engine, [spec])[0]
        drafts = [e for e in events if isinstance(e, Draft)]
        assert drafts and all(d.ids[5:8] == [50, 51, 52] for d in drafts if d.canvas == 0)
        assert len(tokens) <= 5 and finished.reason in ("stop", "length")
        # the same draws as generate_steps with the suffix pinned, so the same middle
        pins = torch.tensor([[-1] * 5 + [50, 51, 52, 53, 54]])
        *_, out = lm.generate_steps([PROMPTS[0]], 10, 0, constraint=Constraint(pins), max_denoising_steps=6)
        expected, _ = lm.decode_new(out.sequences[0], len(PROMPTS[0]))
        assert tokens == expected[:5]
        with pytest.raises(canvaslm.errors.GenerationError, match="maximum context length"):
            engine.submit(Request(prompt=PROMPTS[0], max_new_tokens=500, emit=queue.Queue().put, suffix=[5] * 20))
    finally:
        engine.stop()
