#!/usr/bin/env bash
# One GPU lease, on the clock: the parent's own answers -> the CPU recipe at lease scale -> a quality frontier.
#
#   bash examples/smol/lease.sh [WORK]            # WORK (default runs/smol-gpu): data/, train/, asset/, logs
#
# Every stage has a wall-clock budget and the next stage runs whatever the last one finished, so the lease always
# ends with an adapter (the trainer exports one at every save) and its numbers under RESULTS:
#   adapter.safetensors.part-*  the adapter, cut in pieces a lease may return (`cat` them back together)
#   results.tar.gz              asset.json, adapter_config.json, metrics.jsonl, loss.png, quality.json/.png,
#                               the data manifests, logs, and seen/ (held-out prompts the new data happens to hold,
#                               a data directory for `canvaslm quality --exclude` on a machine without that data)
# Environment (defaults for one H200, ~9 minutes in all):
#   BUILDERS=4 DATA_S=180   data builders at once (each its own seed range), seconds they write parts
#   TRAIN_MIN=4.0           minutes of training (optim.max_minutes); TRAIN_ARGS: more overrides
#   QUALITY_S=90            seconds for the quality frontier; QUALITY_ARGS: its options
#   PROMPTS=runs/smol-cpu/eval-prompts-240  held-out prompts (seed 100000; data parts use other seeds)
#   DATA_CONFIG, TRAIN_CONFIG, RESULTS (default WORK/results)
set -uo pipefail  # not -e: a stage cut by its clock still hands on what it finished
WORK=${1:-runs/smol-gpu}
HERE=$(cd "$(dirname "$0")" && pwd)
RESULTS=${RESULTS:-$WORK/results}
BUILDERS=${BUILDERS:-4}
DATA_S=${DATA_S:-180}
TRAIN_MIN=${TRAIN_MIN:-4.0}
QUALITY_S=${QUALITY_S:-90}
PROMPTS=${PROMPTS:-runs/smol-cpu/eval-prompts-240}
DATA_CONFIG=${DATA_CONFIG:-$HERE/data-gpu.toml}
TRAIN_CONFIG=${TRAIN_CONFIG:-$HERE/train-gpu.toml}
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"
read -r -a QUALITY_EXTRA <<< "${QUALITY_ARGS:---limit 200 --batch-size 50 --speed-prompts 0 --no-verified}"
SETTINGS=(--setting order=left_to_right,acceptance=threshold,accept_probability=0.9
          --setting order=left_to_right,acceptance=threshold,accept_probability=0.8
          --setting order=left_to_right,acceptance=threshold,accept_probability=0.7
          --setting order=left_to_right,acceptance=threshold,accept_probability=0.5
          --setting entropy_bound=0.3 --setting entropy_bound=1.0)
DEFAULTS=(--set order=left_to_right --set acceptance=threshold --set accept_probability=0.9
          --set max_denoising_steps=16 --set sampler=fast --set first_token=causal --set canvas_size=4
          --set t_max=0.45 --set t_min=0.4 --set presence_penalty=1.0)
mkdir -p "$WORK" "$RESULTS"
results() {  # what the lease returns besides the adapter; written twice, in case the quality stage is cut off
  tar -czf "$RESULTS/results.tar.gz" -C "$WORK" --ignore-failed-read asset/asset.json \
    asset/adapter/adapter_config.json train/metrics.jsonl train/loss.png train-summary.json train.err quality.json \
    quality.png quality.log seen $(cd "$WORK" && ls build-*.log data/part-*/manifest.json 2>/dev/null)
}
step() { printf '\n== %s (%s s in) ==\n' "$*" "$SECONDS" >&2; }

step "1/5 data: $BUILDERS builders for $DATA_S s"
for b in $(seq 1 "$BUILDERS"); do
  timeout -k 10 "$DATA_S" canvaslm data build "$DATA_CONFIG" --out "$WORK/data" --parts 1000 \
    --first-part $((b * 10000)) > "$WORK/build-$b.log" 2>&1 &
done
wait
python3 - "$WORK/data" <<'PY' >&2
import sys
from canvaslm.train.shards import open_shards
data = open_shards(sys.argv[1])
parts = data.parts  # a directory of parts, or one data directory as a single part
tokens = sum(p.manifest["tokens"] for p in parts)
print(f"data: {len(parts)} parts, {len(data)} examples, {tokens} tokens")
PY

step "2/5 train for $TRAIN_MIN minutes"
timeout -k 30 "$(python3 -c "print(int(float('$TRAIN_MIN') * 60 + 150))")" canvaslm train "$TRAIN_CONFIG" \
  "data.path=$WORK/data" "train.out_dir=$WORK/train" "optim.max_minutes=$TRAIN_MIN" "${TRAIN_EXTRA[@]}" \
  > "$WORK/train.log" 2> "$WORK/train.err"
tail -n 1 "$WORK/train.log" > "$WORK/train-summary.json"
tail -n 3 "$WORK/train.err" >&2

step "3/5 asset"
canvaslm asset pack "$WORK/train" --out "$WORK/asset" --training "$WORK/train-summary.json" "${DEFAULTS[@]}" >&2
split -b 15M -d "$WORK/asset/adapter/adapter_model.safetensors" "$RESULTS/adapter.safetensors.part-"

step "4/5 held-out prompts the new data holds"
python3 - "$PROMPTS" "$WORK/data" "$WORK/seen" <<'PY' >&2
import json, shutil, sys
from pathlib import Path
import numpy as np
from canvaslm.train.shards import open_shards
prompts, data, out = open_shards(sys.argv[1]), open_shards(sys.argv[2]), Path(sys.argv[3])
wanted = {tuple(prompts[i][0].tolist()) for i in range(len(prompts))}
seen = [data[i] for i in range(len(data)) if tuple(data[i][0].tolist()) in wanted]
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
tokens = np.concatenate([np.concatenate([p, r]) for p, r in seen]).astype("<u4") if seen else np.zeros(0, "<u4")
tokens.tofile(out / "tokens.bin")
offsets = np.cumsum([0] + [len(p) + len(r) for p, r in seen[:-1]]) if seen else []
np.save(out / "index.npy", np.array([[o, len(p), len(r)] for o, (p, r) in zip(offsets, seen)], np.int64).reshape(-1, 3))
first = data.parts[0]
manifest = {**first.manifest, "examples": len(seen), "tokens": int(tokens.size), "sources": [],
            "note": f"examples of {sys.argv[2]} whose prompt is one of {sys.argv[1]}"}
(out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
print(f"held-out prompts found in the new data: {len(seen)}")
PY

results
step "5/5 quality frontier for $QUALITY_S s"
timeout -k 10 "$QUALITY_S" canvaslm quality "$WORK/asset" --prompts "$PROMPTS" --exclude "$WORK/data" \
  --dtype auto "${QUALITY_EXTRA[@]}" "${SETTINGS[@]}" --out "$WORK/quality.json" > "$WORK/quality.log" 2>&1
tail -n 5 "$WORK/quality.log" >&2

step "results -> $RESULTS"
results
ls -la "$RESULTS" >&2
cat "$WORK/train-summary.json"
