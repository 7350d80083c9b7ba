"""`canvaslm data build CONFIG.toml --out DIR` and `canvaslm data info DIR [--json]`.

Also runnable alone: `python -m canvaslm.train.data_cli build CONFIG.toml --out DIR`. To hang it under the
main command, call `add_parser(subparsers)` and dispatch "data" to `run(args)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from canvaslm.errors import CanvasError


def add_parser(sub: Any) -> None:
    """Register `data build` and `data info` on an argparse subparsers object."""
    data = sub.add_parser("data", help="build and inspect training data (prompt/response examples)")
    commands = data.add_subparsers(dest="data_command", required=True)
    build = commands.add_parser("build", help="run the sources of a TOML config into a data directory")
    build.add_argument("config", help="TOML file: [tokenizer], [[source]] (magpie, files, jsonl), [filters]")
    build.add_argument("--out", "-o", required=True, help="data directory to create")
    build.add_argument("--force", action="store_true", help="replace --out if it exists")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.add_argument("--parts", type=int, default=None, metavar="N",
                       help="build N parts --out/part-<i> (seeds + i), skipping finished ones: a cut-off build "
                            "resumes; the trainer reads the finished parts as one dataset")
    build.add_argument("--first-part", type=int, default=0, metavar="K", help="with --parts: start at part K")
    info = commands.add_parser("info", help="summarize a data directory's manifest")
    info.add_argument("dir", help="data directory")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")


def run(args: argparse.Namespace) -> int:
    """Run a parsed `data` command; CanvasErrors propagate to the caller."""
    from canvaslm.train import data
    from canvaslm.train.shards import open_shards

    if args.data_command == "build" and args.parts is not None:
        for manifest in data.build_parts(args.config, args.out, args.parts, first=args.first_part,
                                         progress=not args.no_progress):
            print(summary(manifest, manifest["build"]["out_dir"]), flush=True)
        print(summary(open_shards(args.out).manifest, args.out))
    elif args.data_command == "build":
        manifest = data.build(args.config, args.out, overwrite=args.force, progress=not args.no_progress)
        print(summary(manifest, args.out))
    else:
        manifest = open_shards(args.dir).manifest
        print(json.dumps(manifest, indent=2, ensure_ascii=False) if args.json else summary(manifest, args.dir))
    return 0


def summary(manifest: dict[str, Any], path: str) -> str:
    """A few human lines about a manifest."""
    tokenizer, lengths = manifest["tokenizer"], manifest["lengths"]
    lines = [
        (f"{path}: {manifest['examples']} examples, {manifest['tokens']} tokens "
         f"(prompt {manifest['prompt_tokens']}, response {manifest['response_tokens']})"),
        (f"tokenizer   {tokenizer['source']} (vocab {tokenizer['vocab_size']}, "
         f"sha256 {tokenizer['vocab_sha256'][:12]}, end of turn {tokenizer['end_of_turn_id']})"),
    ]
    for source in manifest["sources"]:
        drops = ", ".join(f"{k} {v}" for k, v in source["source_drops"].items())
        lines.append(f"source      {source['name']}: kept {source['kept']} of {source['produced']}"
                     + (f" ({drops})" if drops else ""))
    dropped = ", ".join(f"{k} {v}" for k, v in manifest["filters"]["dropped"].items()) or "nothing"
    lines.append(f"filters     dropped {dropped}")
    for name in ("prompt", "response"):
        s = lengths[name]
        lines.append(f"{name + ' len':<11} min {s['min']}, mean {s['mean']}, p50 {s['p50']}, p95 {s['p95']}, "
                     f"max {s['max']}")
    lines.append(f"created     {manifest['created']} in {manifest['build']['seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="canvaslm", description="canvaslm data commands")
    add_parser(parser.add_subparsers(dest="command", required=True))
    # `python -m canvaslm.train.data_cli build ...` works as well as `... data build ...`
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv if argv[:1] == ["data"] else ["data", *argv])
    try:
        return run(args)
    except CanvasError as error:
        print(f"canvaslm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
