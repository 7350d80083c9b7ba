#!/usr/bin/env bash
# SmolLM2-135M-Instruct -> block diffusion, end to end: data -> train -> asset -> quality report -> sampler defaults.
#
#   bash examples/smol/convert.sh toy  [OUT]   # this CPU, minutes: proves every stage on a handful of examples
#   bash examples/smol/convert.sh full [OUT]   # one GPU lease (docs/default-model.md), then INSTALL=1 to ship it
#
# OUT (default runs/smol-SCALE) ends up holding data/, eval-prompts/, train/ (metrics.jsonl, loss.png, adapter/,
# model/), asset/ (the shippable delta), quality.json + quality.png and summary.json. A cut-off run resumes where it
# stopped when started again with the same OUT (training resumes from its last checkpoint; built data is kept).
set -euo pipefail
SCALE=${1:-toy}
OUT=${2:-runs/smol-$SCALE}
HERE=$(cd "$(dirname "$0")" && pwd)
case "$SCALE" in
  toy)  TRAIN=(optim.max_steps=4 optim.batch_size=2 optim.warmup_steps=1 data.held_out=4 data.max_canvases=4
               model.diffusion_canvas_length=16 lora.rank=8 lora.alpha=16 train.save_every=2 train.eval_every=4
               train.log_every=1 eval.examples=4 eval.sample_examples=2)
        # an untrained canvas keeps nearly nothing and runs every step it may: few steps, no verified row
        QUALITY=(--limit 8 --max-new-tokens 16 --batch-size 4 --speed-prompts 1 --no-verified)
        SETTINGS=(--setting entropy_bound=0.1,max_denoising_steps=8
                  --setting entropy_bound=1.0,max_denoising_steps=8) ;;
  full) TRAIN=()
        QUALITY=(--limit 200 --max-new-tokens 128 --batch-size 50 --speed-prompts 10)
        SETTINGS=(--setting entropy_bound=0.1 --setting entropy_bound=0.3 --setting entropy_bound=1.0
                  --setting entropy_bound=3.0 --setting max_denoising_steps=16
                  --setting entropy_bound=1.0,t_min=0.2,t_max=0.6) ;;
  *)    echo "usage: convert.sh toy|full [OUT]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
step() { printf '\n== %s ==\n' "$*" >&2; }

step "1/5 data: training chats and code, then held-out quality prompts"
[ -f "$OUT/data/manifest.json" ] || canvaslm data build "$HERE/data-$SCALE.toml" --out "$OUT/data" --force
[ -f "$OUT/eval-prompts/manifest.json" ] || canvaslm data build "$HERE/eval-$SCALE.toml" --out "$OUT/eval-prompts" --force

step "2/5 train (LoRA, DiffusionGemma objective)"
canvaslm train "$HERE/train.toml" "data.path=$OUT/data" "train.out_dir=$OUT/train" "${TRAIN[@]}" | tee "$OUT/train.log"
tail -n 1 "$OUT/train.log" > "$OUT/train-summary.json"

step "3/5 asset: the adapter on top of the GGUF base"
canvaslm asset pack "$OUT/train" --out "$OUT/asset" --training "$OUT/train-summary.json"

step "4/5 quality: GenPPL / entropy / distinct-4 / tokens per forward / tok/s vs the AR parent"
canvaslm quality "$OUT/asset" --prompts "$OUT/eval-prompts" --exclude "$OUT/data" "${QUALITY[@]}" "${SETTINGS[@]}" \
  --out "$OUT/quality.json"

step "5/5 sampler defaults: the fastest setting within 1.5x the AR model's GenPPL (else the best GenPPL)"
BEST=$(python - "$OUT/quality.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
limit = report["autoregressive"]["genppl"] * report["targets"]["genppl_ratio_max"]
points = report["diffusion"]
good = [p for p in points if p["genppl"] <= limit]
best = max(good, key=lambda p: p["tokens_per_forward"]) if good else min(points, key=lambda p: p["genppl"])
print(",".join(f"{k}={v}" for k, v in best["setting"].items()))
PY
)
canvaslm asset pack "$OUT/train" --out "$OUT/asset" --training "$OUT/train-summary.json" ${BEST:+--set "$BEST"}
python - "$OUT" "$BEST" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {"out": str(out), "sampler_defaults": sys.argv[2], "train": json.loads((out / "train-summary.json").read_text()),
           "acceptance": json.loads((out / "quality.json").read_text())["acceptance"]}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({"asset": str(out / "asset"), "sampler_defaults": sys.argv[2],
                  "all_passed": summary["acceptance"]["all_passed"]}))
PY
if [ "${INSTALL:-0}" = 1 ]; then
  step "install: $OUT/asset -> canvaslm/assets/smol"
  rm -rf "$HERE/../../canvaslm/assets/smol" && cp -r "$OUT/asset" "$HERE/../../canvaslm/assets/smol"
fi
