#!/usr/bin/env bash
# The whole Sudoku experiment on a CPU (docs/sudoku.md): train the diffusion model and the AR baseline side by side
# (one thread each: two single-threaded runs use a 2-core CPU better than one 2-thread run), then evaluate both on
# held-out puzzles, compare acceptance rules, and install the diffusion model as the bundled `sudoku` model.
#   bash examples/sudoku/run.sh            # ~90 min on a 2-core CPU
set -euo pipefail
cd "$(dirname "$0")/../.."
OMP_NUM_THREADS=1 canvaslm train examples/sudoku/diffusion.toml &
OMP_NUM_THREADS=1 canvaslm train examples/sudoku/ar.toml &
wait
mkdir -p docs/benchmarks
canvaslm sudoku eval -m runs/sudoku-diffusion/model -m runs/sudoku-ar/model -n 200 \
    --out docs/benchmarks/sudoku-eval.json
canvaslm sudoku eval -m runs/sudoku-diffusion/model -n 200 --constraints --out docs/benchmarks/sudoku-constraints.json
canvaslm sudoku eval -m runs/sudoku-diffusion/model -n 200 --difficulty hard --out docs/benchmarks/sudoku-policies.json \
    --setting acceptance=entropy_bound,entropy_bound=0.1 --setting acceptance=entropy_bound,entropy_bound=1.0 \
    --setting acceptance=threshold,accept_probability=0.9 --setting acceptance=threshold,accept_probability=0.7 \
    --setting acceptance=top_k,accept_k=4 --setting acceptance=top_k,accept_k=16 \
    --setting acceptance=adaptive,accept_factor=1.0 --setting acceptance=adaptive,accept_factor=2.0
rm -rf canvaslm/assets/sudoku && mkdir -p canvaslm/assets && cp -r runs/sudoku-diffusion/model canvaslm/assets/sudoku
