"""`canvaslm sudoku solve|eval|play|data`: solve puzzles with a trained model, score it on held-out puzzles,
watch a grid fill in, and build puzzle sets.

Puzzle files are JSON lines `{"puzzle": "<81 chars, '.' or '0' for blanks>"}`; `solve --json` writes one line
per input line, in order: `{"solution": "<81 digits>", "forward_passes": N, "valid": true}`, or `{"error": ...}`
for a malformed line (the others are still solved).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

from canvaslm.errors import CanvasError
from canvaslm.plotting import new_figure, save
from canvaslm.sudoku import board as sudoku

DEFAULT_MODEL = "sudoku"
# A grid diffusion model reads each puzzle in this many symmetric forms, the likeliest answer kept, unless told
# otherwise: the setting measured to solve the most (docs/sudoku.md, session 17); `solve()` itself defaults to one.
DEFAULT_VIEWS = 4
VIEW_KEYS = ("views", "views_combine")  # --setting keys that are the solver's, not the sampler's
EVAL_SEED = 1_000_000  # seed streams of `eval` puzzles; training uses streams below 1,000


def add_parser(sub: Any, sampling_args: Any) -> None:
    """Register `sudoku` and its commands on an argparse subparsers object; `sampling_args(parser)` adds the
    diffusion sampling flags."""
    parser = sub.add_parser("sudoku", help="solve, evaluate and watch Sudoku with a trained model")
    commands = parser.add_subparsers(dest="sudoku_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", "-m", action="append", default=None,
                       help=f"model dir or name (default {DEFAULT_MODEL}); eval takes several")
        p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
        p.add_argument("--constraints", action="store_true", help="also refuse digits a given in the same row, "
                       "column or box holds (reported separately from the model-alone mode)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--views", type=int, default=None, help="read each puzzle in this many symmetric forms, "
                       f"that many times the compute per pass (default: {DEFAULT_VIEWS} for a grid diffusion model, "
                       "else 1)")
        p.add_argument("--views-combine", default="likeliest", choices=("likeliest", "mean"),
                       help="likeliest: decode each view on its own and keep the answer the model gives the highest "
                            "probability (default); mean: average the views' beliefs at every pass")
        sampling_args(p)

    solve = commands.add_parser("solve", help="solve the puzzles of a JSONL file")
    solve.add_argument("--input", "-i", required=True, help='JSONL file of {"puzzle": ...} lines ("-" = stdin)')
    solve.add_argument("--json", action="store_true", help="one JSON object per line (default: the 81 digits)")
    solve.add_argument("--batch-size", type=int, default=64)
    common(solve)
    evaluate = commands.add_parser("eval", help="solve rate and forward passes on generated held-out puzzles")
    evaluate.add_argument("--difficulty", default="easy,medium,hard", help="comma-separated: easy, medium, hard")
    evaluate.add_argument("--puzzles", "-n", type=int, default=200, help="puzzles per difficulty")
    evaluate.add_argument("--batch-size", type=int, default=100)
    evaluate.add_argument("--out", default=None, help="write the results as JSON here (and PNGs beside it)")
    evaluate.add_argument("--setting", action="append", default=[], metavar="K=V[,K=V]",
                          help="a sampler setting to evaluate, e.g. acceptance=threshold,accept_probability=0.9 "
                               "or views=4,views_combine=likeliest (repeatable; each model runs every setting; "
                               "--out also plots the frontier)")
    common(evaluate)
    play = commands.add_parser("play", help="solve one puzzle, drawing the grid at every denoising step")
    play.add_argument("--puzzle", default=None, help="81 characters (default: a new one of --difficulty)")
    play.add_argument("--difficulty", default="hard", choices=sudoku.DIFFICULTIES)
    play.add_argument("--show-canvas", action="store_true", help="draw every step (default: only the result)")
    common(play)
    data = commands.add_parser("data", help="generate puzzles with unique solutions as JSONL")
    data.add_argument("--difficulty", default="hard", choices=sudoku.DIFFICULTIES)
    data.add_argument("--puzzles", "-n", type=int, default=100)
    data.add_argument("--seed", type=int, default=EVAL_SEED)
    data.add_argument("--out", "-o", default="-", help="JSONL file (default stdout)")


def run(args: argparse.Namespace, sampling: dict[str, Any]) -> int:
    """Run a parsed `sudoku` command; CanvasErrors propagate to the caller."""
    if args.sudoku_command == "data":
        return _data(args)
    models = args.model or [DEFAULT_MODEL]
    if len(models) > 1 and args.sudoku_command != "eval":
        raise CanvasError(f"sudoku {args.sudoku_command} takes one --model, got {len(models)}")
    if args.sudoku_command == "eval":
        return _eval(args, models, sampling)
    lm = _load(models[0], args.device)
    return (_solve if args.sudoku_command == "solve" else _play)(args, lm, sampling)


def _load(name: str, device: str | None):
    from canvaslm import load
    from canvaslm.sudoku.solver import check_model

    lm = load(name, device=device)
    check_model(lm)
    return lm


def _views(lm, asked: int | None) -> int:
    """`--views` as asked, else `DEFAULT_VIEWS` for a grid diffusion model and 1 for any other."""
    from canvaslm.sudoku.solver import is_grid_model

    if asked is not None:
        return asked
    return DEFAULT_VIEWS if lm.kind == "diffusion" and is_grid_model(lm) else 1


def _solve(args: argparse.Namespace, lm, sampling: dict[str, Any]) -> int:
    from canvaslm.sudoku.solver import solve

    lines = _read_lines(args.input)
    results: list[dict[str, Any] | None] = [None] * len(lines)
    parsed: list[tuple[int, list[int]]] = []
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "puzzle" not in record:
                raise sudoku.PuzzleError('expected a JSON object with a "puzzle" field')
            parsed.append((n, sudoku.parse(record["puzzle"])))
        except (json.JSONDecodeError, sudoku.PuzzleError) as error:
            results[n] = {"error": f"{args.input}: line {n + 1}: {error}"}
    for start in range(0, len(parsed), max(args.batch_size, 1)):
        chunk = parsed[start:start + args.batch_size]
        answers = solve(lm, [cells for _, cells in chunk], rules=args.constraints, seed=args.seed,
                        views=_views(lm, args.views), views_combine=args.views_combine, **sampling)
        for (n, _), answer in zip(chunk, answers):
            results[n] = {"solution": answer.solution, "forward_passes": answer.forward_passes,
                          "valid": answer.solved}
    failed = 0
    for result in results:
        assert result is not None
        if "error" in result:
            failed += 1
            print(json.dumps(result) if args.json else f"error: {result['error']}")
            if not args.json:
                print(f"canvaslm: {result['error']}", file=sys.stderr)
        else:
            print(json.dumps(result) if args.json else result["solution"])
    return 1 if failed else 0


def _read_lines(path: str) -> list[str]:
    if path == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise CanvasError(f"{path}: cannot read the puzzle file: {error.strerror or error}") from error
        except UnicodeDecodeError as error:
            raise CanvasError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    return [line for line in text.splitlines() if line.strip()]


def evaluate(lm, difficulties: list[str], n: int, batch_size: int, rules: bool, seed: int,
             sampling: dict[str, Any], views: int = 1, views_combine: str = "mean") -> dict[str, Any]:
    """Solve rate, blank cells right (vs the unique solution), forward passes per puzzle, seconds per puzzle and
    the solve rate by the hardest human technique a puzzle needs, on n held-out puzzles per difficulty."""
    from canvaslm.sudoku.solver import solve
    from canvaslm.sudoku.techniques import GRADES

    out: dict[str, Any] = {}
    for difficulty in difficulties:
        # one stream per difficulty, whichever others are asked for: the same hard puzzles in every run
        pairs = list(sudoku.puzzles(difficulty, n, EVAL_SEED + sudoku.DIFFICULTIES.index(difficulty)))
        start, answers = time.perf_counter(), []
        for first in range(0, n, batch_size):
            cells = [sudoku.parse(p) for p, _ in pairs[first:first + batch_size]]
            answers += solve(lm, cells, rules=rules, seed=seed + first, views=views, views_combine=views_combine,
                             **sampling)
        seconds = time.perf_counter() - start
        blanks = [(a.solution[i], solution[i]) for a, (puzzle, solution) in zip(answers, pairs, strict=True)
                  for i in range(81) if puzzle[i] in ".0"]
        by_grade: dict[str, list[bool]] = {}
        for answer, (puzzle, _) in zip(answers, pairs, strict=True):
            by_grade.setdefault(_technique(puzzle), []).append(answer.solved)
        out[difficulty] = {"puzzles": n, "solve_rate": sum(a.solved for a in answers) / n,
                           "blank_cell_accuracy": sum(x == y for x, y in blanks) / max(len(blanks), 1),
                           "forward_passes": sum(a.forward_passes for a in answers) / n,
                           "seconds_per_puzzle": seconds / n,
                           # which puzzles it solves: by the hardest human technique each needs (techniques.py)
                           "by_technique": {g: {"puzzles": len(by_grade[g]), "solve_rate": sum(by_grade[g]) /
                                                len(by_grade[g])} for g in GRADES if g in by_grade}}
        if lm.kind == "diffusion":
            threshold = lm.diffusion_settings(dict(sampling)).accept_probability
            out[difficulty]["guesses"] = guesses(answers, pairs, threshold)
    return out


def guesses(answers: list, pairs: list[tuple[str, str]], threshold: float) -> dict[str, float]:
    """How the digits were kept, up to each puzzle's first wrong digit (after it, later digits read a wrong one).
    A *guess* is a blank kept below `threshold`: a pass where no blank reached it keeps the most likely one anyway.
    Per puzzle: guesses made, the share of them right, and how many puzzles went wrong first at a guess or at a
    digit kept at or above the threshold (a confident error)."""
    guessed = right = from_guess = from_sure = 0
    for answer, (puzzle, solution) in zip(answers, pairs, strict=True):
        blanks = [i for i in range(81) if puzzle[i] in ".0"]
        wrong = [answer.kept_at[i] for i in blanks if answer.solution[i] != solution[i]]
        first = min(wrong, default=10**9)  # the pass of the first wrong digit
        for i in blanks:
            if answer.certainty[i] < threshold and answer.kept_at[i] <= first:
                guessed += 1
                right += answer.solution[i] == solution[i]
        errors = [answer.certainty[i] for i in blanks
                  if answer.kept_at[i] == first and answer.solution[i] != solution[i]]
        from_guess += bool(errors) and min(errors) < threshold
        from_sure += bool(errors) and min(errors) >= threshold
    n = len(answers)
    return {"threshold": threshold, "per_puzzle": guessed / n, "right": right / guessed if guessed else 1.0,
            "wrong_first_at_a_guess": from_guess / n, "wrong_first_at_a_sure_digit": from_sure / n}


@functools.lru_cache(maxsize=4096)
def _technique(puzzle: str) -> str:
    """The grade of a held-out puzzle, once per puzzle however many models and settings read it."""
    from canvaslm.sudoku.techniques import grade

    return grade(sudoku.parse(puzzle))


def _eval(args: argparse.Namespace, models: list[str], sampling: dict[str, Any]) -> int:
    difficulties = [d.strip() for d in args.difficulty.split(",") if d.strip()]
    unknown = [d for d in difficulties if d not in sudoku.DIFFICULTIES]
    if unknown or not difficulties:
        raise CanvasError(f"--difficulty: unknown {unknown or 'empty list'}; expected among {sudoku.DIFFICULTIES}")
    report: dict[str, Any] = {"settings": {"puzzles_per_difficulty": args.puzzles, "constraints": args.constraints,
                                           "seed": args.seed, **sampling}, "models": {}}
    from canvaslm.cli_args import key_values

    settings = [key_values(s, "--setting") for s in args.setting] or [{}]
    for name in models:
        lm = _load(name, args.device)
        for setting in settings if lm.kind == "diffusion" else [{}]:
            label = name + "".join(f" {k}={v}" for k, v in setting.items())
            views = setting["views"] if "views" in setting else _views(lm, args.views)
            views = views if lm.kind == "diffusion" else 1
            combine = str(setting.get("views_combine", args.views_combine))
            result = evaluate(lm, difficulties, args.puzzles, args.batch_size, args.constraints, args.seed,
                              {**sampling, **{k: v for k, v in setting.items() if k not in VIEW_KEYS}}, views,
                              combine)
            report["models"][label] = {"kind": lm.kind, "setting": setting, "views": views,
                                       "views_combine": combine if views > 1 else None,
                                       "parameters": sum(p.numel() for p in lm.network.parameters()), **result}
            for difficulty, row in result.items():
                print(f"{label}  {difficulty:6s}  solved {row['solve_rate']:.1%}  blanks right "
                      f"{row['blank_cell_accuracy']:.1%}  forward passes "
                      f"{row['forward_passes']:.1f}  {row['seconds_per_puzzle'] * 1000:.1f} ms/puzzle")
                print("    by technique needed: " + ", ".join(f"{g} {r['solve_rate']:.0%} of {r['puzzles']}"
                                                          for g, r in row["by_technique"].items()))
                if "guesses" in row:
                    g = row["guesses"]
                    print(f"    guesses (kept below {g['threshold']}) up to the first wrong digit: "
                          f"{g['per_puzzle']:.1f} per puzzle, {g['right']:.1%} right; puzzles gone wrong first at "
                          f"a guess {g['wrong_first_at_a_guess']:.1%}, at a sure digit "
                          f"{g['wrong_first_at_a_sure_digit']:.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        plot(report, Path(args.out).with_suffix(".png"))
        if len(report["models"]) > 1:
            plot_frontier(report, Path(args.out).with_name(Path(args.out).stem + "-frontier.png"), difficulties[-1])
    return 0


def plot_frontier(report: dict[str, Any], png: Path, difficulty: str) -> bool:
    """Blank cells right against forward passes per puzzle, one point per (model, setting), on one difficulty;
    the legend gives each point's setting and solve rate."""
    figure = new_figure(8, 6.5)
    if figure is None:
        return False
    axes = figure.add_subplot()
    one_model = len({label.split(" ", 1)[0] for label in report["models"]}) == 1
    for label, row in report["models"].items():
        point = row[difficulty]
        name = (label.split(" ", 1)[1] if " " in label else "model defaults") if one_model else label
        axes.plot(point["forward_passes"], 100 * point["blank_cell_accuracy"],
                  "s" if row["kind"] != "diffusion" else "o", markersize=8,
                  label=f"{name} — solved {100 * point['solve_rate']:.0f}%")
    axes.set_xlabel("forward passes per puzzle (fewer = faster)")
    axes.set_ylabel(f"{difficulty}: blank cells right (%)")
    axes.set_title("Sudoku: speed vs quality per model and sampler setting")
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=1)
    return save(figure, png)


def plot(report: dict[str, Any], png: Path) -> bool:
    """Solve rate (bars) and forward passes per puzzle (labels) per model and difficulty; False without
    matplotlib."""
    models = report["models"]
    difficulties = [d for d in sudoku.DIFFICULTIES if any(d in row for row in models.values())]
    figure = new_figure(7, 4)
    if figure is None:
        return False
    axes = figure.add_subplot()
    width = 0.8 / max(len(models), 1)
    for i, (name, row) in enumerate(models.items()):
        xs = [j + i * width for j in range(len(difficulties))]
        rates = [100 * row[d]["solve_rate"] if d in row else 0 for d in difficulties]
        bars = axes.bar(xs, rates, width, label=f"{name} ({row['kind']})")
        labels = [f"{row[d]['forward_passes']:.0f} fp" if d in row else "" for d in difficulties]
        axes.bar_label(bars, labels=labels, fontsize=8)
    axes.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(difficulties))], difficulties)
    axes.set_ylabel("puzzles solved (%)")
    axes.set_ylim(0, 110)
    axes.set_title("Sudoku: solve rate (bar labels: forward passes per puzzle)")
    axes.legend(fontsize=8)
    return save(figure, png)


def _play(args: argparse.Namespace, lm, sampling: dict[str, Any]) -> int:
    import random

    from rich.console import Console
    from rich.live import Live

    from canvaslm.diffusion.generate import DenoisingStep
    from canvaslm.sudoku.solver import solve_steps

    puzzle = args.puzzle or sudoku.generate(args.difficulty, random.Random(args.seed))[0]
    cells = sudoku.parse(puzzle)
    console = Console()
    live = Live(console=console, refresh_per_second=10) if args.show_canvas and console.is_terminal else None
    answers: list[Any] = []
    if live is not None:
        live.start()
    try:
        for event in solve_steps(lm, [cells], rules=args.constraints, seed=args.seed, views=_views(lm, args.views),
                                 views_combine=args.views_combine, **sampling):
            if isinstance(event, DenoisingStep) and args.show_canvas:
                grid = sudoku.decode_cells(event.draft[0].tolist())
                view = grid_text(cells, grid, event.accepted[0].tolist(), f"step {event.step}/{event.max_steps}")
                if live is not None:
                    live.update(view)
                else:
                    console.print(view)
            elif isinstance(event, list):
                answers = event
    finally:
        if live is not None:
            live.stop()
    answer, views = answers[0], _views(lm, args.views)
    how = f" (the likeliest of {views} views; the steps drawn are the puzzle's as given)" if (
        views > 1 and args.views_combine == "likeliest" and args.show_canvas) else ""
    console.print(grid_text(cells, [0 if c == '.' else int(c) for c in answer.solution], [True] * 81,
                            f"{'solved' if answer.solved else 'NOT solved'} in {answer.forward_passes} forward "
                            f"passes{how}"))
    return 0 if answer.solved else 1


def grid_text(givens: list[int], grid: list[int], accepted: list[bool], title: str):
    """A rich Text drawing of the grid: givens bold, accepted cells green, still-noisy cells dim."""
    from rich.text import Text

    text = Text(title + "\n", style="cyan")
    for r in range(9):
        if r and r % 3 == 0:
            text.append("------+-------+------\n", style="dim")
        for c in range(9):
            i = 9 * r + c
            if c and c % 3 == 0:
                text.append("| ", style="dim")
            style = "bold" if givens[i] else "green" if accepted[i] else "dim"
            text.append(f"{grid[i] or '.'} ", style=style)
        text.append("\n")
    return text


def _data(args: argparse.Namespace) -> int:
    from rich.progress import track

    if args.puzzles < 1:
        raise CanvasError(f"--puzzles must be >= 1, got {args.puzzles}")
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")  # noqa: SIM115
    try:
        pairs = sudoku.puzzles(args.difficulty, args.puzzles, args.seed)
        for puzzle, solution in track(pairs, total=args.puzzles, description="generating",
                                      console=None if args.out != "-" else _stderr_console(), transient=True):
            out.write(json.dumps({"puzzle": puzzle, "solution": solution, "difficulty": args.difficulty,
                                  "clues": sudoku.clue_count(puzzle)}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr)
