"""A measurement prototype, not a feature: the default's canvases with a check at each commit, at batch 1.

The causal pass that commits a canvas computes the parent's logits at every committed position, and the loop reads
only the last (the next canvas's first token). Here the others score the canvas: the first decoder-drawn token the
parent gives less than `eps` probability, after the text before it, is dropped with everything after it (the cache
rolled back), and the next canvas's first token is drawn from the parent at that position (`first_from_causal`).
`eps` 0 is the shipped loop: the script first checks that it writes `LM.generate`'s answers token for token.

    python examples/smol/commit-check-prototype.py PROMPTS N OUT.json SETTING...

PROMPTS: a `canvaslm data build` directory or a JSONL file (`canvaslm quality --prompts`); SETTING: a JSON object of
sampler overrides plus `eps`, e.g. '{"eps": 0.01, "accept_probability": 0.7}'. One row per setting beside the AR
parent at temperature 0.7 (GenPPL under the float32 parent, mean unigram entropy, distinct-4, tokens a decoder pass,
tokens a forward with the causal passes counted, tokens dropped). docs/default-model.md, "Session 33".
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter

import torch

import canvaslm
from canvaslm.bench.quality import judge_nll, read_prompts
from canvaslm.diffusion.generate import encode_chunked, open_logits, read_outputs
from canvaslm.diffusion.sampling import count_tokens
from canvaslm.diffusion.step import canvas_size, denoise_step, first_from_causal, self_conditioning, start_canvas

MAX_NEW_TOKENS = 128


def answer(lm, prompt: list[int], eps: float, seed: int, overrides: dict) -> dict:
    """One answer (ids up to end-of-turn), whether it stopped, and its passes and drops."""
    model, settings = lm.network, lm.diffusion_settings(dict(overrides))
    generator = torch.Generator().manual_seed(seed)
    size, eos, mask_id = canvas_size(model, settings), set(model.eos_token_ids), model.mask_token_id
    cache = model.new_cache(1)
    counts = torch.zeros(1, model.vocab_size) if settings.presence_penalty or settings.frequency_penalty else None
    out, last, decoder, causal, dropped = [], None, 0, 0, 0
    new = torch.tensor([prompt])
    with torch.inference_mode():
        while True:
            ones = torch.ones_like(new, dtype=torch.bool)
            hidden = encode_chunked(model, new, cache, ones) if last is None else model.encode(new, cache, ones)
            causal += 1
            before = model.logits(hidden[:, -1:])
            if last is not None and eps > 0:
                probs = model.logits(hidden[:, :-1]).float().softmax(-1)[0]      # row i predicts token i + 1
                bad = (probs.gather(-1, last[1:, None]).squeeze(-1) < eps).nonzero()
                if len(bad):
                    keep = int(bad[0]) + 1
                    cache.rollback(len(last), torch.tensor([keep]))
                    removed = last[keep:]
                    del out[len(out) - len(removed):]
                    dropped += len(removed)
                    count_tokens(counts, removed[None], torch.full((1, len(removed)), -1.0))
                    before = model.logits(hidden[:, keep - 1:keep])
            if any(t in eos for t in out) or len(out) >= MAX_NEW_TOKENS:
                break
            state = start_canvas(1, size, model.vocab_size, settings, generator, new.device, mask_id, None, None)
            state = first_from_causal(state, before, settings, generator, mask_token_id=mask_id, counts=counts)
            for _ in range(settings.max_denoising_steps - state.step):
                decoder += 1
                sc, _ = self_conditioning(state)
                hidden = model.decode(state.canvas, cache, sc, hidden_states=True)
                logits = open_logits(model.logits(hidden[read_outputs(state.canvas, mask_id, True)]), state.canvas,
                                     mask_id, before)
                state = denoise_step(state, logits, settings, generator, vocab_size=model.vocab_size,
                                     mask_token_id=mask_id, sc_dtype=None, counts=counts).state
                if bool(state.stopped.all()):
                    break
            last = state.draft[0]
            count_tokens(counts, last[None])
            out += last.tolist()
            new = last[None]
            if eps == 0 and (any(t in eos for t in out) or len(out) >= MAX_NEW_TOKENS):
                break  # the shipped loop does not encode its last canvas
    stop = next((i for i, t in enumerate(out) if t in eos), None)
    ids = out[:stop] if stop is not None else out
    return {"ids": ids[:MAX_NEW_TOKENS], "stopped": stop is not None and stop <= MAX_NEW_TOKENS,
            "decoder": decoder, "causal": causal, "dropped": dropped}


def distinct_4(answers: list[list[int]]) -> float:
    grams = [tuple(a[i:i + 4]) for a in answers for i in range(len(a) - 3)]
    return len(set(grams)) / max(1, len(grams))


def unigram_entropy(ids: list[int]) -> float:
    return -sum(c / len(ids) * math.log(c / len(ids)) for c in Counter(ids).values()) if ids else 0.0


def main(prompts_path: str, limit: int, out_path: str, settings: list[dict]) -> None:
    torch.set_num_threads(2)
    lm = canvaslm.load("smol", dtype="auto", quantize="auto")
    judge = canvaslm.load("smol-ar")  # float32, dense: the report's judge
    prompts = read_prompts(prompts_path, limit, lm.tokenizer)
    for i, prompt in enumerate(prompts[:2]):
        ours = answer(lm, prompt, 0.0, 1000 + i, {})["ids"]
        ref, _ = lm.decode_new(lm.generate(prompt, MAX_NEW_TOKENS, seed=1000 + i).sequences[0], len(prompt))
        assert ours == ref[:MAX_NEW_TOKENS], "with eps 0 the prototype must write LM.generate's answer"
    parent = canvaslm.load("smol-ar", dtype="auto", quantize="auto")
    start = time.time()
    answers, stopped = [], []
    for i, prompt in enumerate(prompts):
        ids, reason = parent.decode_new(parent.generate(prompt, MAX_NEW_TOKENS, seed=1000 + i,
                                                        temperature=0.7).sequences[0], len(prompt))
        answers.append(ids[:MAX_NEW_TOKENS])
        stopped.append(reason == "stop")
    nll, n = judge_nll(judge, prompts, answers, stopped)
    ar_ppl, ar_entropy = math.exp(nll / n), sum(map(unigram_entropy, answers)) / len(answers)
    rows = [{"system": "AR, temperature 0.7", "genppl": round(ar_ppl, 3), "distinct_4": round(distinct_4(answers), 3),
             "seconds": round(time.time() - start, 1)}]
    print(json.dumps(rows[-1]), flush=True)
    for setting in settings:
        overrides = {k: v for k, v in setting.items() if k != "eps"}
        start = time.time()
        results = [answer(lm, p, setting.get("eps", 0.0), 1000 + i, overrides) for i, p in enumerate(prompts)]
        answers = [r["ids"] for r in results]
        nll, n = judge_nll(judge, prompts, answers, [r["stopped"] for r in results])
        tokens, decoder, causal = (sum(len(a) for a in answers), sum(r["decoder"] for r in results),
                                   sum(r["causal"] for r in results))
        rows.append({"setting": setting, "genppl_x_ar": round(math.exp(nll / n) / ar_ppl, 3),
                     "entropy_x_ar": round(sum(map(unigram_entropy, answers)) / len(answers) / ar_entropy, 3),
                     "distinct_4": round(distinct_4(answers), 3), "tokens": tokens,
                     "tokens_per_decoder_pass": round(tokens / decoder, 3),
                     "tokens_per_forward_with_causal_passes": round(tokens / (decoder + causal), 3),
                     "dropped": sum(r["dropped"] for r in results), "empty": sum(not a for a in answers),
                     "seconds": round(time.time() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    with open(out_path, "w") as f:
        json.dump({"prompts": prompts_path, "questions": len(prompts), "max_new_tokens": MAX_NEW_TOKENS,
                   "precision": "float32 + int4 (auto), 2 threads, batch 1", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], [json.loads(s) for s in sys.argv[4:]])
