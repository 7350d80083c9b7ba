"""How many tokens a canvas pass can keep: the ceiling an AR parent's own distribution sets for any canvas model.

A pass that starts at answer position j reads the text before j and masks from j on. The best a canvas model can
predict for position j + d there is the parent's marginal p(x_{j+d} | x_<j), the d tokens between summed out. The
left-to-right threshold rule (`order=left_to_right, acceptance=threshold`) keeps position j always and each next
position while its most likely token has probability >= accept_probability. So along the parent's own answers, at
the temperature the canvas model is trained and judged at, how often those marginals are sure bounds the tokens per
pass of every canvas model of that parent under that rule: a model that keeps more is sure where the parent is not,
and pays for it in quality.

`lookahead` computes the marginals by expanding the most likely candidates of each position in between (`widths`,
one per depth); the probability mass left out bounds the error both ways. `replay` runs the rule along each
answer canvas by canvas, once with the generous bound (largest marginal + mass left out: no model as sure as the
parent does better) and once with the strict one (what the expanded candidates alone give).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from canvaslm.bench.quality import answer
from canvaslm.engine.ar import advance, prefill

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
WIDTHS = (8, 4, 2)  # candidates expanded at depths 1, 2, 3: a pass of up to 4 tokens is judged


@torch.inference_mode()
def lookahead(model: Any, prompt: Sequence[int], answer_ids: Sequence[int], temperature: float,
              widths: Sequence[int] = WIDTHS) -> tuple[Tensor, Tensor]:
    """(largest marginal, mass left out), both [n, 1 + len(widths)]: entry [j, d] is about p(x_{j+d} | x_<j) under
    the AR `model` at `temperature`, the tokens between summed over the top widths[0] x widths[1] x ... candidates
    (d = 0 is exact: nothing left out)."""
    device = next(model.parameters()).device
    cache = model.new_cache(1, device)
    ids = torch.tensor([list(prompt)], device=device)
    logits = prefill(model, ids, cache, torch.ones_like(ids, dtype=torch.bool))
    depth = 1 + len(widths)
    best, missing = torch.zeros(len(answer_ids), depth), torch.zeros(len(answer_ids), depth)
    for j, token in enumerate(answer_ids):
        dist = (logits.float() / temperature).softmax(-1)                        # [1, V]
        best[j, 0] = dist.max()
        weight = torch.ones(1, device=device)                                    # each row's path probability
        probe = copy.deepcopy(cache)
        for d, width in enumerate(widths, start=1):
            top_p, top_i = dist.topk(width, dim=-1)                              # [R, w]
            weight = (weight[:, None] * top_p).reshape(-1)                       # [R * w]
            probe.select(torch.arange(dist.shape[0], device=device).repeat_interleave(width))
            dist = (advance(model, probe, top_i.reshape(-1, 1)).float() / temperature).softmax(-1)
            best[j, d] = (weight[:, None] * dist).sum(0).max()
            missing[j, d] = (1 - weight.sum()).clamp(min=0)
        logits = advance(model, cache, torch.tensor([[token]], device=device))
    return best, missing


def replay(sure: Tensor, canvas: int, first_from_causal: bool = False) -> list[int]:
    """The tokens each pass of the left-to-right rule keeps along one answer, where sure[j, d] says whether a pass
    starting at j keeps position j + d (if it kept those before it); a pass never crosses a canvas boundary
    (canvases start at the answer's start). `first_from_causal` (`first_token = "causal"`): each canvas's first
    token comes from the causal pass before it, so no decoder pass starts at a canvas's first position."""
    n, depth = sure.shape
    j, kept_per_pass = 0, []
    while j < n:
        if first_from_causal and j % canvas == 0:
            j += 1
            continue
        end = min(n, (j // canvas + 1) * canvas)
        kept = 1
        while kept < depth and j + kept < end and bool(sure[j, kept]):
            kept += 1
        kept_per_pass.append(kept)
        j += kept
    return kept_per_pass


def ceiling(judge: Any, prompts: Sequence[list[int]], *, temperature: float = 0.7, max_new_tokens: int = 128,
            canvas: int = 16, widths: Sequence[int] = WIDTHS, thresholds: Sequence[float] = THRESHOLDS,
            batch_size: int = 8, seed: int = 0, progress: Any = None) -> dict[str, Any]:
    """The report: the judge's own answers at `temperature` (as the quality report's AR row), then per threshold
    the tokens per pass a perfect canvas model keeps under the left-to-right threshold rule: at most
    `tokens_per_pass` (the generous bound), at least `tokens_per_pass_strict`, the generous bound when each
    canvas's first token comes from the causal pass (`tokens_per_pass_first_causal`), and the share of passes that reach
    the deepest position judged (1 + len(widths): a ceiling near it is cut by the depth, not by the parent)."""
    responses, *_ = answer(judge, prompts, {"temperature": temperature}, max_new_tokens, batch_size, seed)
    bounds = []
    for prompt, response in zip(prompts, responses, strict=True):
        if response:
            bounds.append(lookahead(judge.network, prompt, response, temperature, widths))
        if progress is not None:
            progress()
    tokens = sum(b.shape[0] for b, _ in bounds)
    depth = 1 + len(widths)
    rows = []
    for tau in thresholds:
        generous = [k for b, m in bounds for k in replay(b + m >= tau, canvas)]
        strict = sum(len(replay(b >= tau, canvas)) for b, _ in bounds)
        first_causal = sum(len(replay(b + m >= tau, canvas, first_from_causal=True)) for b, m in bounds)
        rows.append({"accept_probability": tau, "tokens_per_pass": tokens / max(1, len(generous)),
                     "tokens_per_pass_strict": tokens / max(1, strict),
                     "tokens_per_pass_first_causal": tokens / max(1, first_causal),
                     "passes_at_depth_share": sum(k == depth for k in generous) / max(1, len(generous))})
    sure = torch.cat([b + m for b, m in bounds]) if bounds else torch.zeros(0, depth)
    return {"judge": judge.source, "temperature": temperature, "prompts": len(prompts), "answer_tokens": tokens,
            "canvas_length": canvas, "widths": list(widths), "rows": rows,
            "sure_share_at_0.9_by_depth": [float((sure[:, d] >= 0.9).float().mean()) for d in range(depth)]
            if len(sure) else []}


def plot_ceiling(report: dict[str, Any], path: Any) -> bool:
    """Tokens per pass against the threshold: the ceiling's two bounds, and the ceiling with the causal first token."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["rows"]
    taus = [r["accept_probability"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(taus, [r["tokens_per_pass"] for r in rows], "o-", label="ceiling (a model no surer than the parent)")
    ax.plot(taus, [r["tokens_per_pass_strict"] for r in rows], "s--", label="strict bound (expanded candidates)")
    if all("tokens_per_pass_first_causal" in r for r in rows):
        ax.plot(taus, [r["tokens_per_pass_first_causal"] for r in rows], "^:",
                label="ceiling, each canvas's first token from the causal pass")
    ax.set_xlabel("accept_probability (left-to-right threshold rule)")
    ax.set_ylabel("tokens per pass")
    ax.set_title(f"{report['judge']} at T = {report['temperature']}: {report['answer_tokens']} answer tokens",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
