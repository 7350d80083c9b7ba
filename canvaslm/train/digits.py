"""Synthetic digit tasks (reverse or sort a sequence given in the prompt): a tiny, exactly scorable task on
which a random model learns block diffusion in minutes on a CPU.

A prompt is `<bos> reverse : 3 1 4 1 5`, its answer `5 1 4 1 3 <eos>`; one token per word."""

from __future__ import annotations

import random

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from canvaslm.checkpoints.tokenizer import Tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>"]
WORDS = [str(d) for d in range(10)] + ["reverse", "sort", ":"]
VOCAB = SPECIALS + WORDS + ["<mask>"]  # <mask>: the noise token when training masked (absorbing) diffusion
PAD, EOS, BOS, MASK = 0, 1, 2, len(VOCAB) - 1
TASKS = ("reverse", "sort")


def tokenizer() -> Tokenizer:
    """A word-level tokenizer over the task's 17 tokens (pad 0, eos 1, bos 2, mask 16)."""
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return Tokenizer(backend, source="canvaslm.train.digits", bos_token="<bos>", eos_token="<eos>",
                     pad_token="<pad>", add_bos_token=True)


def answer(task: str, digits: list[int]) -> list[int]:
    if task == "reverse":
        return digits[::-1]
    if task == "sort":
        return sorted(digits)
    raise ValueError(f"unknown digit task {task!r}; expected one of {TASKS}")


def example(task: str, digits: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) for one instance; the response ends with EOS."""
    ids = {w: i for i, w in enumerate(VOCAB)}
    prompt = [BOS, ids[task], ids[":"]] + [ids[str(d)] for d in digits]
    return prompt, [ids[str(d)] for d in answer(task, digits)] + [EOS]


def examples(task: str, n: int, min_digits: int, max_digits: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """n random instances, reproducible from seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_digits, max_digits)
        out.append(example(task, [rng.randrange(10) for _ in range(length)]))
    return out
