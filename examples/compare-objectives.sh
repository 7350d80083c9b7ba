#!/usr/bin/env bash
# Train the tiny-cpu task once per objective variant with the same budget and print one JSON line each:
#   bash examples/compare-objectives.sh [STEPS]      (results in runs/compare-*/)
set -euo pipefail
steps=${1:-600}
common=(optim.max_steps=$steps optim.warmup_steps=50 train.eval_every=$steps train.save_every=$steps
        train.log_every=100 eval.examples=200 eval.sample_examples=200)
for variant in ${VARIANTS:-flat udlm masked flat-shift}; do
  case $variant in
    flat)       extra=(objective.kind=flat) ;;
    udlm)       extra=(objective.kind=udlm) ;;
    masked)     extra=(objective.kind=masked objective.mask_token_id=16) ;;
    flat-shift) extra=(objective.kind=flat objective.shift=true) ;;
  esac
  rm -rf "runs/compare-$variant"
  canvaslm train examples/tiny-cpu.toml "${common[@]}" "${extra[@]}" train.out_dir="runs/compare-$variant" \
    2>/dev/null | tail -n 1 | python3 -c "import json, sys; r = json.load(sys.stdin); print(json.dumps({'variant': '$variant', **{k: round(v, 4) for k, v in r.items() if k.startswith('eval_') or k in ('tokens_per_forward', 'elapsed')}}))"
done
