#!/usr/bin/env bash
# The recipe table of docs/training.md: short runs of one budget (same data, seed and steps) from the AR parent, one
# per variant, each scored by `canvaslm quality` on held-out questions (GenPPL under the parent vs tokens per
# forward at a few sampler settings: a small frontier per variant). Results: runs/recipes/<variant>/{model,quality.json}
# and one JSON line per variant on stdout (also runs/recipes/table.jsonl).
#   bash examples/smol/compare-recipes.sh STEPS DATA PROMPTS [VARIANT ...]
#   e.g. bash examples/smol/compare-recipes.sh 120 runs/smol-cpu/data-t07 runs/smol-cpu/eval-prompts-240
# Variants (default: all five):
#   masked16   the CPU recipe up to session 13: masked noise + shift, canvas 16, random masks with complementary
#              copies and 15% anchored draft canvases, batch 8
#   anchorless the same without anchored draft canvases (objective.anchor_p = 0)
#   masked32   canvas 32 (4 canvases: the same 128 response tokens)
#   flat16     DiffusionGemma's objective: uniform noise, no shift, every supervised position scored
#   prefix16   the CPU recipe since session 14 (examples/smol/train-cpu.toml): 80% of canvases laid out as
#              left-to-right decoding sees them (objective.prefix_p = 0.8: a clean prefix, masks after it), no
#              complementary copies, batch 16 (the same rows per step)
# Environment: LIMIT (held-out questions, default 32), THREADS (default 2), SETTINGS (sampler settings, space-separated,
# each K=V[,K=V]; default: entropy bounds 1.0 and 0.3 by confidence, and threshold 0.9 left to right).
set -euo pipefail
steps=${1:?steps}; data=${2:?data directory}; prompts=${3:?held-out prompts}; shift 3
variants=("$@"); [ ${#variants[@]} -gt 0 ] || variants=(masked16 anchorless masked32 flat16 prefix16)
limit=${LIMIT:-32}; threads=${THREADS:-2}
chosen=${SETTINGS:-"entropy_bound=1.0 entropy_bound=0.3 order=left_to_right,acceptance=threshold,accept_probability=0.9"}
settings=(); for s in $chosen; do settings+=(--setting "$s"); done
common=(data.path="$data" optim.max_steps="$steps" optim.warmup_steps=$(( steps < 10 ? 1 : 10 )) train.save_every="$steps"
        train.eval_every="$steps" train.log_every=10 train.resume=false objective.anchor_p=0.15)
random_masks=(objective.prefix_p=0.0 objective.complementary=true optim.batch_size=8)
mkdir -p runs/recipes
for variant in "${variants[@]}"; do
  case $variant in
    masked16)   extra=("${random_masks[@]}") ;;
    anchorless) extra=("${random_masks[@]}" objective.anchor_p=0.0) ;;
    masked32)   extra=("${random_masks[@]}" model.diffusion_canvas_length=32 data.max_canvases=4) ;;
    flat16)     extra=("${random_masks[@]}" objective.kind=flat objective.shift=false objective.anchor_p=0.0) ;;
    prefix16)   extra=(objective.anchor_p=0.0) ;;
    *) echo "unknown variant $variant (masked16, anchorless, masked32, flat16, prefix16)" >&2; exit 2 ;;
  esac
  out=runs/recipes/$variant
  rm -rf "$out"
  OMP_NUM_THREADS=$threads canvaslm train examples/smol/train-cpu.toml "${common[@]}" "${extra[@]}" \
    train.out_dir="$out" > "$out.train.log" 2>&1
  canvaslm quality "$out/model" --prompts "$prompts" --exclude "$data" --limit "$limit" --dtype auto \
    --threads "$threads" --speed-prompts 0 --no-verified "${settings[@]}" --out "$out/quality.json" \
    > "$out.quality.log" 2>&1
  python3 - "$variant" "$out" <<'EOF' | tee -a runs/recipes/table.jsonl
import json, sys
variant, out = sys.argv[1], sys.argv[2]
report = json.load(open(f"{out}/quality.json"))
train = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
logged = [m for m in train if m.get("split") == "train"]  # one line per log_every steps: that step's tokens
steps = max(m["step"] for m in logged)
row = {"variant": variant, "steps": steps, "train_tokens": round(steps * sum(m["tokens"] for m in logged) / len(logged)),
       "ar_genppl": round(report["autoregressive"]["genppl"], 2),
       "ar_entropy": round(report["autoregressive"]["unigram_entropy"], 3)}
for r in report["diffusion"]:  # one entry per sampler setting, named by it
    name = ",".join(f"{k}={v}" for k, v in r["setting"].items())
    row[name] = {k: round(r[k], 3) for k in ("genppl", "unigram_entropy", "distinct_4", "tokens_per_forward")}
print(json.dumps(row))
EOF
done
