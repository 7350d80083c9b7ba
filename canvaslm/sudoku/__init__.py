"""Sudoku: the board and its tokens (board.py), solving with a model (solver.py), `canvaslm sudoku` (cli.py).

The training task that teaches a model to solve lives with the other training tasks (canvaslm/train/sudoku_tasks.py)."""
