"""Write a randomly initialised DiffusionGemma checkpoint at a given shape, for speed benchmarks (`canvaslm bench
compare -m OUT`): the real model's text config (../shared/diffusiongemma-26b-a4b-text-config.json) or a scaled-down
copy of it. Needs transformers (the reference builds and saves the model, so both engines read identical weights).

    python examples/bench/random_diffusion_gemma.py OUT --config TEXT_CONFIG.json \
        [--set hidden_size=512 --set num_hidden_layers=6 ...] [--canvas 32] [--logit-gain 4]

`--logit-gain` scales the tied embedding so the random decoder is confident, as a trained one is; without it the
entropy-bound sampler accepts one token per step and every canvas runs all 48 steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

VISION = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "patch_size": 4,
          "position_embedding_size": 64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", type=Path, required=True, help="JSON with a text_config object")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a text_config field (JSON value); num_hidden_layers also cuts layer_types")
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--logit-gain", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = json.loads(args.config.read_text())["text_config"]
    for item in args.set:
        key, _, value = item.partition("=")
        text[key] = json.loads(value)
    text["layer_types"] = text["layer_types"][:text["num_hidden_layers"]]
    config = DiffusionGemmaConfig(text_config=text, vision_config=VISION, canvas_length=args.canvas)
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(config).to(getattr(torch, args.dtype)).eval()
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.mul_(args.logit_gain)
    model.save_pretrained(args.out)
    parameters = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n)
    print(f"{args.out}: {parameters / 1e6:.1f}M text parameters, canvas {args.canvas}")


if __name__ == "__main__":
    main()
