"""The AR decode loop against transformers' generate on a tiny random Llama, plus sampling and EOS handling."""

from __future__ import annotations


import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from canvaslm.engine.ar import ar_generate, sample_next, sample_next_each, top_k_filter, top_p_filter
from canvaslm.errors import GenerationError
from canvaslm.models.llama import Config, Model

VOCAB, PAD, EOS = 61, 0, 2



@pytest.fixture(scope="module")
def pair() -> tuple[LlamaForCausalLM, Model]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=EOS, pad_token_id=PAD)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(20)  # peaked distributions: no near-ties for greedy to trip on
    with torch.device("meta"):
        ours = Model(Config.from_hf(config.to_dict(), "tiny"))
    return hf, ours.load_hf_tensors(hf.state_dict(), "tiny")


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    lengths, width = [9, 4, 6], 9
    ids = torch.randint(3, VOCAB, (3, width), generator=torch.Generator().manual_seed(1))
    valid = torch.arange(width)[None, :] >= torch.tensor([width - n for n in lengths])[:, None]
    return ids.masked_fill(~valid, PAD), valid


def hf_greedy(hf: LlamaForCausalLM, ids: torch.Tensor, valid: torch.Tensor, n: int, eos: int) -> torch.Tensor:
    return hf.generate(ids, attention_mask=valid.long(), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                       pad_token_id=PAD)


def test_greedy_matches_transformers(pair: tuple[LlamaForCausalLM, Model]) -> None:
    hf, ours = pair
    ids, valid = prompts()
    out = ar_generate(ours, ids, valid, 16, temperature=0.0, eos_token_ids=[VOCAB + 1], pad_token_id=PAD)
    assert torch.equal(out.sequences, hf_greedy(hf, ids, valid, 16, VOCAB + 1))  # EOS outside the vocab: never hit
    assert out.forward_passes == 16 and out.new_tokens.tolist() == [16, 16, 16]


def test_eos_then_pad_like_transformers(pair: tuple[LlamaForCausalLM, Model]) -> None:
    hf, ours = pair
    ids, valid = prompts()
    free = ar_generate(ours, ids, valid, 12, temperature=0.0, eos_token_ids=[VOCAB + 1]).sequences[:, 9:]
    eos = int(free[1, 1])  # row 1 stops after 2 tokens, the others when (if) they produce it
    stops = [int((row == eos).nonzero()[0]) + 1 if (row == eos).any() else 12 for row in free]
    out = ar_generate(ours, ids, valid, 12, temperature=0.0, eos_token_ids=[eos], pad_token_id=PAD)
    assert torch.equal(out.sequences, hf_greedy(hf, ids, valid, 12, eos))
    assert out.new_tokens.tolist() == stops and out.forward_passes == max(stops)
    for row, stop in enumerate(stops):
        assert (out.sequences[row, 9 + stop:] == PAD).all()


def test_all_rows_done_stops_early(pair: tuple[LlamaForCausalLM, Model]) -> None:
    _, ours = pair
    ids, valid = prompts()
    first = ar_generate(ours, ids[:1], valid[:1], 1, temperature=0.0).sequences[0, -1]
    streamed: list[torch.Tensor] = []
    out = ar_generate(ours, ids[:1], valid[:1], 50, temperature=0.0, eos_token_ids=[int(first)],
                      on_token=streamed.append)
    assert out.sequences.shape == (1, 10) and out.forward_passes == 1 and out.new_tokens.tolist() == [1]
    assert torch.equal(torch.stack(streamed, dim=1), out.sequences[:, 9:])


def test_top_k_one_is_greedy_and_seeded_sampling_repeats(pair: tuple[LlamaForCausalLM, Model]) -> None:
    _, ours = pair
    ids, valid = prompts()
    greedy = ar_generate(ours, ids, valid, 10, temperature=0.0).sequences
    top1 = ar_generate(ours, ids, valid, 10, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(top1.sequences, greedy)

    def sampled(seed: int) -> torch.Tensor:
        return ar_generate(ours, ids, valid, 10, temperature=2.0, top_p=0.95, top_k=20, eos_token_ids=[],
                           generator=torch.Generator().manual_seed(seed)).sequences

    assert torch.equal(sampled(7), sampled(7))
    assert not torch.equal(sampled(7), sampled(8))


def test_filters() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True]]
    assert torch.equal(top_k_filter(logits, 0), logits)
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    assert torch.isinf(top_p_filter(probs.log(), 0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(top_p_filter(probs.log(), 0.85)).sum() == 1  # 0.5 + 0.3 < 0.85: one 0.1 is needed
    assert torch.equal(top_p_filter(probs.log(), 1.0), probs.log())
    assert torch.isinf(top_p_filter(probs.log(), 0.01)).sum() == 3  # the top token always survives
    assert sample_next(logits, 0.0, 0, 1.0, None).tolist() == [1]


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}])
def test_bad_arguments(pair: tuple[LlamaForCausalLM, Model], kwargs: dict) -> None:
    _, ours = pair
    ids, valid = prompts()
    with pytest.raises(GenerationError):
        ar_generate(ours, ids, valid, 4, **kwargs)


def test_sampling_draws_from_the_filtered_distribution() -> None:
    """The inverse-CDF draw has the softmax's distribution: 40,000 draws per row land within 4 sigma."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.05, 0.05, 0.1, 0.2, 0.6]])
    logits = probs.clamp(min=1e-12).log().repeat_interleave(20_000, dim=0)
    draws = sample_next(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(0)).view(2, 20_000)
    for row in range(2):
        counts = torch.bincount(draws[row], minlength=5).float()
        expected = probs[row] * 20_000
        sigma = (expected * (1 - probs[row])).sqrt().clamp(min=1.0)
        assert ((counts - expected).abs() <= 4 * sigma).all(), (counts, expected)
    assert not (draws[0] == 4).any()  # a zero-probability token is never drawn
    top2 = sample_next(logits[:20_000], 1.0, 2, 1.0, torch.Generator().manual_seed(1))
    assert set(top2.tolist()) == {0, 1}


def test_next_tokens_drawn_together_are_those_each_row_draws_alone():
    """`sample_next_each` (the serving engine's running sequences): rows with their own options (temperatures,
    greedy, top-k, top-p, penalties, a grammar's allowed tokens, n-gram bans) and generators get, token for token,
    what `sample_next` draws for each alone, and each generator ends where it would have. Bf16 logits."""
    vocab = 64
    base = dict(temperature=0.7, top_k=0, top_p=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                no_repeat_ngram_size=0)
    options = [base, dict(base, temperature=1.0, presence_penalty=1.0), dict(base, frequency_penalty=0.5),
               dict(base, top_k=5), dict(base, top_p=0.9, temperature=1.3), dict(base, temperature=0.0),
               dict(base, no_repeat_ngram_size=2), base, dict(base, presence_penalty=0.3)] * 3
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(len(options), vocab, generator=generator) * 3).bfloat16()
    counts = [torch.randint(0, 3, (1, vocab), generator=generator).float() if i % 4 else None
              for i in range(len(options))]
    written = [torch.randint(0, vocab, (1, 8), generator=generator) for _ in options]
    allowed = [None] * len(options)
    allowed[7] = torch.rand(1, vocab, generator=generator) > 0.5
    seeds = range(200, 200 + len(options))
    alone_gens, gens = [torch.Generator().manual_seed(s) for s in seeds], [torch.Generator().manual_seed(s)
                                                                            for s in seeds]
    alone = [int(sample_next(logits[i:i + 1], o["temperature"], o["top_k"], o["top_p"], alone_gens[i], allowed[i],
                             counts[i], o["presence_penalty"], o["frequency_penalty"], written[i],
                             o["no_repeat_ngram_size"])) for i, o in enumerate(options)]
    together = sample_next_each(logits, options, gens, allowed, counts, written)
    assert together.tolist() == alone and len(set(alone)) > 5
    for a, b in zip(alone_gens, gens, strict=True):
        assert torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=b))
