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
    alphabet: str | None = None  # when set, tokens with another character are refused without running them


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


def _compare(state: int, digit: str, bound: str, k: int) -> int:
    """Lexicographic comparison (-1, 0, 1) of k + 1 digits with bound's first k + 1, given the first k's."""
    if state != 0 or k >= len(bound):
        return state if k < len(bound) else 1
    return (digit > bound[k]) - (digit < bound[k])


def number_range(low: int | None, high: int | None, fraction: bool = False, max_digits: int = 15) -> Automaton:
    """JSON integers in [low, high] (None: unbounded), then filler; with `fraction`, also I.ddd where the whole
    of [I, I + 1) lies in the range (a subset of the valid numbers, so every answer validates).

    A state is a sign with its magnitude range [a, b], the digits read k, and how those digits compare with a's
    and b's first k (-1, 0, 1): a k-digit magnitude is below a bound with more digits and above one with fewer,
    so this decides the range exactly. Only the states reachable from the start are built."""
    branches: dict[str, tuple[str, str]] = {}  # sign -> (a, b) as digit strings, b "" when unbounded
    if high is None or high >= 0:
        branches["+"] = (str(max(low, 0) if low is not None else 0), "" if high is None else str(high))
    if low is None or low < 0:  # -m with m >= 1; m <= -low and m >= -high
        branches["-"] = (str(max(-high, 1) if high is not None else 1), "" if low is None else str(-low))

    def at_least_a(sign: str, k: int, vs_a: int) -> bool:
        a = branches[sign][0]
        return k > len(a) or k == len(a) and vs_a >= 0

    def below_b(sign: str, k: int, vs_b: int, strictly: bool) -> bool:
        b = branches[sign][1]
        return not b or k < len(b) or k == len(b) and (vs_b < 0 if strictly else vs_b <= 0)

    def accepts(state: tuple) -> bool:
        kind = state[0]
        if kind == "digits":
            _, sign, k, vs_a, vs_b = state
            return at_least_a(sign, k, vs_a) and below_b(sign, k, vs_b, strictly=False)
        return kind == "fraction" or kind == "filler" or kind == "zero" and branches["+"][0] == "0"

    def takes_fraction(state: tuple) -> bool:  # [I, I + 1) within the range: I >= a (or -I - 1 >= low) and I < b
        if state[0] == "zero":  # only "+0" exists: 0.ddd needs a = 0 and b >= 1 (or unbounded)
            return branches["+"][0] == "0" and (not branches["+"][1] or int(branches["+"][1]) >= 1)
        _, sign, k, vs_a, vs_b = state
        return at_least_a(sign, k, vs_a) and below_b(sign, k, vs_b, strictly=True)

    def step(state: tuple, char: str) -> tuple | None:
        kind, digit = state[0], char.isascii() and char.isdigit()
        if char in WHITESPACE:
            return ("filler",) if accepts(state) else None
        if kind == "start" and char == "-" and "-" in branches:
            return ("minus",)
        if kind in ("start", "minus") and digit:
            sign = "-" if kind == "minus" else "+"
            if char == "0":
                return ("zero",) if sign == "+" and "+" in branches else None
            if sign not in branches:
                return None
            state = ("digits", sign, 0, 0, 0)
            kind = "digits"
        if kind == "digits" and digit:
            _, sign, k, vs_a, vs_b = state
            a, b = branches[sign]
            vs_a, vs_b = _compare(vs_a, char, a, k), _compare(vs_b, char, b, k) if b else -1
            if k + 1 > max_digits or b and (k + 1 > len(b) or k + 1 == len(b) and vs_b > 0):
                return None  # already above b
            return ("digits", sign, k + 1, vs_a, vs_b)
        if char == "." and fraction and kind in ("zero", "digits") and takes_fraction(state):
            return ("point",)
        if kind in ("point", "fraction") and digit:
            return ("fraction",)
        return None

    alphabet = "-.0123456789" + WHITESPACE
    ids: dict[tuple, int] = {("start",): 0}
    edges: dict[tuple[int, str], int] = {}
    queue = [("start",)]
    while queue:
        state = queue.pop()
        for char in alphabet:
            nxt = step(state, char)
            if nxt is not None:
                if nxt not in ids:
                    ids[nxt] = len(ids)
                    queue.append(nxt)
                edges[ids[state], char] = ids[nxt]
    accepting = frozenset(i for state, i in ids.items() if accepts(state))
    return Automaton(len(ids), 0, accepting, lambda s, c: edges.get((s, c), -1), alphabet)


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
        # the (from, to) pairs some token realises, with those tokens' ids (a few for number grammars, most of the
        # vocabulary for strings; ids rather than [V] masks keep hundreds of edges cheap)
        self.edges = [(s, q, (table[s] == q).nonzero().squeeze(1)) for s in range(table.shape[0])
                      for q in sorted(set(table[s].tolist()) - {-1})]

    @classmethod
    def lift(cls, automaton: Automaton, texts: Sequence[str | None]) -> TokenGrammar:
        """Run every token's text through the automaton from every state."""
        table = torch.full((automaton.states, len(texts)), -1, dtype=torch.int16)
        chars = set(automaton.alphabet) if automaton.alphabet is not None else None
        candidates = [(t, text) for t, text in enumerate(texts)
                      if text is not None and (chars is None or chars.issuperset(text))]
        for s in range(automaton.states):
            for t, text in candidates:
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
            for s, q, tokens in self.edges:
                if s in forward[p] and q in backward[p + 1]:
                    allowed[p, tokens] = True
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
            for s, q, tokens in self.edges:
                if score[s] == float("-inf"):
                    continue
                value, best = log_probs[p, tokens].max(dim=0)
                if score[s] + value > new[q]:
                    new[q], choice[q] = score[s] + value, (s, int(tokens[best]))
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
