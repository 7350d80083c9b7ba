#!/usr/bin/env bash
# The whole Sudoku experiment on a CPU (docs/sudoku.md): train the diffusion model and the AR baseline side by side
# (one thread each: two single-threaded runs use a 2-core CPU better than one 2-thread run), then evaluate both on
# held-out puzzles and compare acceptance rules.
#   bash examples/sudoku/run.sh            # ~90 min on a 2-core CPU (80 min training, 6 min evaluation)
set -euo pipefail
cd "$(dirname "$0")/../.."
OMP_NUM_THREADS=1 canvaslm train examples/sudoku/diffusion.toml &
OMP_NUM_THREADS=1 canvaslm train examples/sudoku/ar.toml &
wait
mkdir -p docs/benchmarks
canvaslm sudoku eval -m runs/sudoku-diffusion/model -m runs/sudoku-ar/model -n 100 --threads 2 \
    --out docs/benchmarks/sudoku-eval.json
canvaslm sudoku eval -m runs/sudoku-diffusion/model -m runs/sudoku-ar/model -n 100 --constraints --threads 2 \
    --setting entropy_bound=1.0,t_max=0.1,t_min=0.05 --out docs/benchmarks/sudoku-constraints.json
L=t_max=0.1,t_min=0.05
canvaslm sudoku eval -m runs/sudoku-diffusion/model -n 100 --difficulty easy,hard --threads 2 \
    --out docs/benchmarks/sudoku-policies.json --setting acceptance=entropy_bound \
    --setting acceptance=entropy_bound,$L --setting acceptance=entropy_bound,entropy_bound=1.0,$L \
    --setting acceptance=top_k,accept_k=1,max_denoising_steps=81,$L --setting acceptance=top_k,accept_k=4,$L \
    --setting acceptance=threshold,accept_probability=0.9,$L --setting acceptance=adaptive,accept_factor=1.0,$L
# A model worth bundling (it solves puzzles) is then installed with:
#   rm -rf canvaslm/assets/sudoku && mkdir -p canvaslm/assets && cp -r runs/sudoku-diffusion/model canvaslm/assets/sudoku
