"""Token-level grammars for the value slots of a structured canvas: which tokens a run of positions may hold, and
its most probable grammatical filling.

A slot of L positions holds one JSON value followed by whitespace filler (JSON allows whitespace after a value,
so a short value in a long slot stays valid). Its grammar is a small character automaton; running every token's
text through it gives, per state, the state each token leads to (`TokenGrammar.table`). Then

* `allowed_tokens` — per position, the tokens on some path from the start to an accepting state in exactly L
  tokens (refused tokens get -inf during denoising: a superset of what is valid, never a subset);
* `project` — the exact most probable path (Viterbi over positions × states, as DINGO does for a block):
  the slot's final tokens, grammatical by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Step = Callable[[int, str], int]
"""(state, character) -> next state, or -1 when the character is not allowed there."""

WHITESPACE = " \n"


@dataclass(frozen=True)
class Automaton:
    states: int
    start: int
    accepting: frozenset[int]
    step: Step


def _string_step(state: int, char: str) -> int:
    # 0: inside the string (opened by a fixed quote), 1: closed, then only filler
    if state == 0:
        return 1 if char == '"' else -1 if char == "\\" or ord(char) < 0x20 else 0
    return 1 if char in WHITESPACE else -1


def _number_step(integer: bool) -> Step:
    # 0 start, 1 after '-', 2 a leading 0, 3 integer digits, 4 after '.', 5 fraction digits, 6 filler
    def step(state: int, char: str) -> int:
        if char in WHITESPACE:
            return 6 if state in (2, 3, 5, 6) else -1
        if state == 0 and char == "-":
            return 1
        if state in (0, 1) and char.isascii() and char.isdigit():
            return 2 if char == "0" else 3
        if state in (3, 5) and char.isascii() and char.isdigit():
            return state
        if state in (2, 3) and char == "." and not integer:
            return 4
        if state == 4 and char.isascii() and char.isdigit():
            return 5
        return -1
    return step


STRING = Automaton(2, 0, frozenset({1}), _string_step)
INTEGER = Automaton(7, 0, frozenset({2, 3, 6}), _number_step(True))
NUMBER = Automaton(7, 0, frozenset({2, 3, 5, 6}), _number_step(False))


def literals(options: Sequence[str]) -> Automaton:
    """One of `options` (JSON literals such as '"red"', 'true', '12'), then filler: a trie of their characters."""
    nodes: dict[str, int] = {"": 0}
    for text in options:
        for i in range(1, len(text) + 1):
            nodes.setdefault(text[:i], len(nodes))
    filler = len(nodes)
    ends = {nodes[text] for text in options}
    names = {i: prefix for prefix, i in nodes.items()}

    def step(state: int, char: str) -> int:
        if state == filler or (state in ends and char in WHITESPACE):
            return filler if char in WHITESPACE else -1
        return nodes.get(names[state] + char, -1)
    return Automaton(filler + 1, 0, frozenset(ends | {filler}), step)


def token_texts(decode: Callable[[list[int]], str], vocab_size: int, anchor: int) -> list[str | None]:
    """The text each token adds after an ordinary token (so leading spaces survive decoders that strip them);
    None for tokens that add nothing or only part of a character (special tokens, byte fragments)."""
    base = decode([anchor])
    out: list[str | None] = []
    for token in range(vocab_size):
        text = decode([anchor, token])
        piece = text[len(base):] if text.startswith(base) else None
        out.append(piece if piece and "\ufffd" not in piece else None)
    return out


class TokenGrammar:
    """A grammar over tokens: `table[s, t]` is the state token t leads to from state s (-1: refused)."""

    def __init__(self, table: Tensor, start: int, accepting: frozenset[int]) -> None:
        self.table, self.start, self.accepting = table, start, accepting
        # the (from, to) pairs some token realises, with those tokens as a [V] mask
        self.edges = [(s, q, table[s] == q) for s in range(table.shape[0])
                      for q in sorted(set(table[s].tolist()) - {-1})]

    @classmethod
    def lift(cls, automaton: Automaton, texts: Sequence[str | None]) -> TokenGrammar:
        """Run every token's text through the automaton from every state."""
        table = torch.full((automaton.states, len(texts)), -1, dtype=torch.int16)
        for s in range(automaton.states):
            for t, text in enumerate(texts):
                if text is None:
                    continue
                state = s
                for char in text:
                    state = automaton.step(state, char)
                    if state < 0:
                        break
                table[s, t] = state
        return cls(table, automaton.start, automaton.accepting)

    def reachable(self, length: int) -> tuple[list[set[int]], list[set[int]]]:
        """forward[p]: states reachable after p tokens; backward[p]: states from which an accepting state is
        reachable in exactly length - p tokens."""
        forward = [{self.start}]
        for _ in range(length):
            forward.append({q for s, q, _ in self.edges if s in forward[-1]})
        backward = [set(self.accepting)]
        for _ in range(length):
            backward.insert(0, {s for s, q, _ in self.edges if q in backward[0]})
        return forward, backward

    def fits(self, length: int) -> bool:
        forward, _ = self.reachable(length)
        return bool(forward[length] & self.accepting)

    def allowed_tokens(self, length: int) -> Tensor:
        """[length, V] bool: tokens on some accepting path of exactly `length` tokens at each position."""
        forward, backward = self.reachable(length)
        allowed = torch.zeros(length, self.table.shape[1], dtype=torch.bool)
        for p in range(length):
            for s, q, mask in self.edges:
                if s in forward[p] and q in backward[p + 1]:
                    allowed[p] |= mask
        return allowed

    def project(self, log_probs: Tensor) -> list[int] | None:
        """The most probable token path of exactly len(log_probs) tokens ending in an accepting state, from
        per-position log-probabilities [L, V]; None if the slot cannot hold any value of this grammar."""
        states, length = self.table.shape[0], log_probs.shape[0]
        log_probs = log_probs.float().cpu()
        score = torch.full((states,), float("-inf"))
        score[self.start] = 0.0
        choices: list[list[tuple[int, int]]] = []  # per position, per state: (previous state, token)
        for p in range(length):
            new = torch.full((states,), float("-inf"))
            choice = [(-1, -1)] * states
            for s, q, mask in self.edges:
                if score[s] == float("-inf"):
                    continue
                value, token = log_probs[p].masked_fill(~mask, float("-inf")).max(dim=0)
                if score[s] + value > new[q]:
                    new[q], choice[q] = score[s] + value, (s, int(token))
            score = new
            choices.append(choice)
        ends = [s for s in self.accepting if score[s] > float("-inf")]
        if not ends:
            return None
        state, tokens = max(ends, key=lambda s: float(score[s])), []
        for choice in reversed(choices):
            state, token = choice[state]
            tokens.append(token)
        return tokens[::-1]


def bounded_string(texts: Sequence[str | None], min_length: int, max_length: int) -> TokenGrammar:
    """String content of min_length..max_length characters, the closing quote, then filler. The state counts the
    characters written (0..max_length); state max_length + 1 is "closed". Built from each token's shape in one
    pass rather than by running the automaton from every count."""
    closed = max_length + 1
    content, closing, filler = [], [], []  # per token: characters before a closing quote; whether it closes
    for text in texts:
        ok = text is not None
        head, quote, tail = (text or "").partition('"')
        ok = ok and all(c != "\\" and ord(c) >= 0x20 for c in head) and all(c in WHITESPACE for c in tail)
        content.append(len(head) if ok else -1)
        closing.append(ok and quote == '"')
        filler.append(text is not None and text != "" and all(c in WHITESPACE for c in text))
    n = torch.tensor(content)
    closes, spaces = torch.tensor(closing), torch.tensor(filler)
    table = torch.full((closed + 1, len(texts)), -1, dtype=torch.int16)
    for count in range(closed):
        after = count + n
        stays = (n >= 0) & ~closes & (after <= max_length)
        ends = closes & (after >= min_length) & (after <= max_length)
        table[count] = torch.where(stays, after, torch.where(ends, closed, -1)).to(torch.int16)
    table[closed] = torch.where(spaces, closed, -1).to(torch.int16)
    return TokenGrammar(table, 0, frozenset({closed}))
