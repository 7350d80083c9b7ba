"""The `canvaslm` command: generate, chat, info, bench, train, data, quality, asset, serve, sudoku."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from canvaslm.bench import cli as bench
from canvaslm.cli_args import key_values, precision_args, set_threads, threads_arg
from canvaslm.loading import load_model
from canvaslm.errors import CanvasError
from canvaslm.hardware import QUANTIZE_CHOICES
from canvaslm.knobs import DECODING, KNOBS
from canvaslm.sudoku import cli as sudoku_cli
from canvaslm.train import data_cli

DEFAULT_MODEL = "smol"  # the block-diffusion SmolLM2 (canvaslm/assets/smol); "smol-ar" is its AR parent
SAMPLING_FLAGS = {k.name: k for k in KNOBS}  # passed to the model only when given


def _model_args(p: argparse.ArgumentParser) -> None:
    threads_arg(p)
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"HF dir, .gguf file or name (default {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    precision_args(p)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--seed", type=int, default=None)
    _sampling_flags(p)


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    for name, knob in SAMPLING_FLAGS.items():
        mode = {"ar": "AR", "diffusion": "diffusion", "both": "every decoding"}[knob.mode]
        help_ = f"{mode}: {knob.help} (default: the model's, else {knob.default})"
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=knob.kind, default=None,
                       choices=knob.choices or None, help=help_.replace("%", "%%"))  # argparse formats help with %


def _decoding_arg(p: argparse.ArgumentParser, who: str = "") -> None:
    p.add_argument("--decoding", choices=DECODING, default=None,
                   help=f"{who}a diffusion model's way to write: its canvases (diffusion, the default), canvas drafts "
                        "checked by its causal pass with the AR output distribution (verified; the same greedy "
                        "tokens as autoregressive with --dtype float32 --quantize none), or the causal pass alone "
                        "(autoregressive); the last two take the AR options (temperature, top_p, top_k)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canvaslm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message with the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, ids and speed")
    gen.add_argument("--show-canvas", action="store_true", help="watch the canvas denoise, step by step")
    gen.add_argument("--json-schema", default=None, metavar="FILE",
                     help="answer with JSON that validates against this JSON schema file (diffusion models: the "
                          "schema canvas; autoregressive ones: llguidance; docs/structured.md)")
    chat = sub.add_parser("chat", help="interactive chat (reads stdin; /reset clears, /exit quits)")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--show-canvas", action="store_true")
    for p in (gen, chat):
        _model_args(p)
        _sampling_args(p)
        _decoding_arg(p)
    info = sub.add_parser("info", help="describe a model")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    info.add_argument("--json", action="store_true")
    bench.add_parser(sub)
    train = sub.add_parser("train", help="train or fine-tune from a TOML config (see examples/tiny-cpu.toml)")
    train.add_argument("config", help="the TOML config")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-3")
    data_cli.add_parser(sub)
    sudoku_cli.add_parser(sub, lambda p: (_sampling_flags(p), threads_arg(p)))
    quality = sub.add_parser("quality", help="GenPPL, entropy, distinct-4, tokens/forward and tok/s of a diffusion "
                             "model next to its AR judge, on held-out prompts")
    threads_arg(quality)
    quality.add_argument("model", help="the diffusion model (HF dir, asset folder or name)")
    quality.add_argument("--judge", default="smol-ar", help="autoregressive judge and baseline (default smol-ar)")
    quality.add_argument("--prompts", required=True, help="data directory (its last N prompts) or JSONL of prompts")
    quality.add_argument("--limit", type=int, default=200, help="number of prompts (default 200)")
    quality.add_argument("--exclude", action="append", default=None,
                         help="training data directory (repeatable): its prompts are not evaluated")
    quality.add_argument("--max-new-tokens", type=int, default=128)
    quality.add_argument("--batch-size", type=int, default=16)
    quality.add_argument("--speed-prompts", type=int, default=10, help="prompts timed at batch 1 (0 = skip)")
    quality.add_argument("--setting", action="append", default=[], metavar="K=V[,K=V]",
                         help="a diffusion sampler setting to evaluate (repeatable; the first is the default; "
                              "none = the model's defaults)")
    quality.add_argument("--ar-temperature", type=float, action="append", default=[], metavar="T",
                         help="also answer with the AR judge at this temperature (repeatable): a reference row for "
                              "settings sharper than the parent at 0.7; the acceptance stays against 0.7")
    quality.add_argument("--seed", type=int, default=0)
    quality.add_argument("--no-verified", action="store_true",
                         help="skip the verified-decoding row (the model's canvas drafts checked by its causal pass)")
    quality.add_argument("--out", required=True,
                         help="JSON report; a PNG frontier plot is written beside it. Each system's answers are kept "
                         "in OUT.partial.json as they finish: a run cut off and started again with the same "
                         "models, prompts and options picks up there")
    quality.add_argument("--device", default=None)
    quality.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                         help="weights of the model and of the AR baseline (auto: bfloat16 where the hardware has it); "
                              "both run in the same dtype, so the speed comparison is fair; GenPPL is scored in "
                              "float32")
    quality.add_argument("--quantize", choices=list(QUANTIZE_CHOICES), default="none",
                         help="weight-only quantized linears of the model and the AR baseline (canvaslm.models.quant)")
    quality.add_argument("--compile-layers", action=argparse.BooleanOptionalAction, default=None,
                         help="the model and the AR baseline run their decoder layer compiled ahead of time "
                              "(`canvaslm.models.aot`; bfloat16 with packed weights). Default: where it runs and "
                              "builds, as `generate` does")
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, streaming, metrics)")
    serve.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model to serve (default {DEFAULT_MODEL})")
    threads_arg(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="the model id clients use (default: MODEL)")
    serve.add_argument("--max-batch", type=int, default=32, help="sequences per forward pass")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting sequences before 429")
    serve.add_argument("--no-pin-settled", action="store_true", help="stream whole canvases only (results then "
                       "equal canvaslm generate for the same seed)")
    _decoding_arg(serve, "requests without a 'decoding' field: ")
    serve.add_argument("--max-draft-batch", type=int, default=None, metavar="N",
                       help="verified decoding and checked canvases (commit_check) draft while at most N of their "
                       "sequences run; above that each step is one autoregressive step for them: the same "
                       "distribution for verified decoding, canvases of the causal pass's one token for canvases "
                       "(default: 1 on CPUs, where a draft's rows cost; no limit elsewhere)")
    serve.add_argument("--device", default=None)
    precision_args(serve)
    asset = sub.add_parser("asset", help="pack a finished LoRA run into a shippable asset folder")
    asset_sub = asset.add_subparsers(dest="asset_command", required=True)
    pack = asset_sub.add_parser("pack", help="adapter + diffusion fields + sampling defaults -> asset folder")
    pack.add_argument("run", help="training out_dir (holds adapter/ and model/)")
    pack.add_argument("--out", required=True, help="asset folder to write (e.g. canvaslm/assets/smol)")
    pack.add_argument("--name", default="smol")
    pack.add_argument("--base", default="smol-ar", help="registered base the adapter applies to")
    pack.add_argument("--set", action="append", default=[], metavar="K=V", help="sampling default, e.g. "
                      "entropy_bound=0.3 (repeatable)")
    pack.add_argument("--training", default=None, help="JSON file summarizing the run, stored in asset.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        set_threads(getattr(args, "threads", None))
        commands = {"generate": _generate, "chat": _chat, "info": _info, "bench": bench.main,
                    "train": _train, "data": data_cli.run, "quality": _quality, "asset": _asset,
                    "serve": _serve, "sudoku": lambda a: sudoku_cli.run(a, _sampling(a))}
        return commands[args.command](args)
    except CanvasError as error:
        print(f"canvaslm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}


def _answer(lm, prompt_ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Generate after prompt_ids, optionally drawing the canvas; returns the fields of --json."""
    import time

    from canvaslm.canvas_view import show

    start = time.perf_counter()
    decoding = lm.decoding_mode(args.decoding)
    if args.show_canvas and lm.kind != "diffusion":
        print(f"canvaslm: --show-canvas: {lm.source} is an autoregressive model (one token per pass, no canvas to "
              "show); it answers without the view. Try a block-diffusion model such as 'smol'.", file=sys.stderr)
    elif args.show_canvas and decoding != "diffusion":
        print(f"canvaslm: --show-canvas: {decoding} decoding writes no canvas to show; it answers without the "
              "view (--decoding diffusion shows it).", file=sys.stderr)
    if args.show_canvas and decoding == "diffusion":
        steps = lm.generate_steps([prompt_ids], args.max_new_tokens, args.seed, **_sampling(args))
        result = show(steps, lambda t: lm.tokenizer.decode([t], skip_special_tokens=False), len(prompt_ids))
    else:
        result = lm.generate([prompt_ids], args.max_new_tokens, args.seed, decoding=decoding, **_sampling(args))
    seconds = time.perf_counter() - start
    ids, reason = lm.decode_new(result.sequences[0], len(prompt_ids))
    ids = ids[: args.max_new_tokens]
    return {"text": lm.tokenizer.decode(ids), "token_ids": ids, "finish_reason": reason,
            "tokens_per_forward": round(float(result.tokens_per_forward[0]), 4),
            "forward_passes": int(result.forward_passes[0]), "seconds": round(seconds, 4),
            "tokens_per_second": round(len(ids) / seconds, 2) if seconds > 0 else None, "model": lm.source}


def _generate(args: argparse.Namespace) -> int:
    lm = load_model(args)
    lm.require_tokenizer()  # a checkpoint without a tokenizer cannot take a text prompt
    if args.chat:
        prompt_ids = lm.chat_prompt_ids([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = lm.tokenizer.encode(args.prompt, add_special_tokens=True)
    if args.json_schema:
        out = _schema_answer(lm, prompt_ids, args)
    else:
        out = _answer(lm, prompt_ids, args)
    out.update(dtype=lm.dtype_name, quantize=lm.quantization, compiled=lm.compiled)
    print(json.dumps(out, ensure_ascii=False) if args.json else out["text"])
    if not args.chat and not out["token_ids"] and out["finish_reason"] == "stop" and lm.tokenizer.chat_template:
        # An instruct model often ends a plain continuation of a finished question at once; say why nothing was
        # written (on stderr: stdout stays one JSON object under --json).
        print(f"canvaslm: {lm.source} ended the text at once (a plain continuation of the prompt); it has a chat "
              "template: ask it with --chat, or end the prompt where the text should go on.", file=sys.stderr)
    return 0


def _schema_answer(lm, prompt_ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """--json-schema: read the schema file (a clear error naming it when unreadable), answer through
    `LM.generate_json`; the fields of --json."""
    try:
        schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
    except OSError as error:
        raise CanvasError(f"{args.json_schema}: cannot read the schema file: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CanvasError(f"{args.json_schema}: not a JSON schema file: {error}") from None
    result = lm.answer(prompt_ids, args.max_new_tokens, args.seed, _sampling(args), schema, args.decoding)
    return {"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "tokens_per_forward": round(result.tokens_per_forward, 4), "forward_passes": result.forward_passes,
            "seconds": round(result.seconds, 4), "model": lm.source}


def _chat(args: argparse.Namespace) -> int:
    lm = load_model(args)
    lm.require_tokenizer()
    interactive = sys.stdin.isatty()
    history = [{"role": "system", "content": args.system}] if args.system else []
    start = len(history)
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            del history[start:]
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        out = _answer(lm, lm.chat_prompt_ids(history), args)
        history.append({"role": "assistant", "content": out["text"]})
        print(out["text"], flush=True)
        if interactive:
            print(f"[{out['tokens_per_second']} tok/s, {out['tokens_per_forward']} tok/forward]", file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    from canvaslm.train.trainer import main as train_main

    return train_main(args.config, args.overrides)


def _info(args: argparse.Namespace) -> int:
    from canvaslm import load

    lm = load(args.model, device="cpu")
    config = lm.config
    facts = {
        "model": args.model, "kind": lm.kind, "architecture": type(lm.network).__module__.rsplit(".", 1)[-1],
        "parameters": sum(p.numel() for p in lm.network.parameters()),
        "layers": config.num_hidden_layers, "hidden_size": config.hidden_size, "vocab_size": lm.network.vocab_size,
        "canvas_length": lm.network.canvas_length, "max_context": lm.max_length,
        "dtype": lm.dtype_name,
        "tokenizer": lm.tokenizer is not None,
        "chat_template": bool(lm.tokenizer is not None and lm.tokenizer.chat_template),
        "eos_token_ids": lm.eos_token_ids,
        "sampling_defaults": vars(lm.diffusion_defaults) if lm.kind == "diffusion" else lm.ar_defaults,
    }
    if args.json:
        print(json.dumps(facts))
    else:
        width = max(map(len, facts))
        for key, value in facts.items():
            print(f"{key:<{width}}  {value}")
    return 0



def _quality(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from canvaslm import load
    from canvaslm.hardware import resolve_dtype
    from canvaslm.loading import compile_choice
    from canvaslm.bench.quality import check_systems, plot_frontier, quality_report, read_prompts

    settings = [key_values(s, "--setting") for s in args.setting] or [{}]
    dtype = resolve_dtype(args.dtype, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compiled = compile_choice(args)
    model = load(args.model, device=args.device, dtype=dtype, quantize=args.quantize, compile=compiled)
    judge = load(args.judge, device=args.device, dtype=dtype, quantize=args.quantize, compile=compiled)
    check_systems(model, judge)
    # GenPPL is scored in float32 without quantization, so reports in different precisions compare
    plain = dtype == torch.float32 and judge.quantization == "none"
    scorer = judge if plain else load(args.judge, device=args.device, dtype=torch.float32)
    prompts = read_prompts(args.prompts, args.limit, judge.require_tokenizer(), args.exclude)
    out = Path(args.out)
    partial = out.with_name(out.stem + ".partial.json")  # each finished system, for a run cut off and started again
    report = quality_report(model, judge, prompts, settings, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, speed_prompts=args.speed_prompts, seed=args.seed,
                            verified=not args.no_verified, scorer=scorer, ar_temperatures=args.ar_temperature,
                            resume=partial)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    partial.unlink(missing_ok=True)
    plotted = plot_frontier(report, out.with_suffix(".png"))
    summary = {"report": str(out), "plot": str(out.with_suffix(".png")) if plotted else None,
               **{k: v["value"] for k, v in report["acceptance"].items() if isinstance(v, dict) and "value" in v},
               "all_passed": report["acceptance"]["all_passed"]}
    print(json.dumps(summary))
    return 0


def _asset(args: argparse.Namespace) -> int:
    from canvaslm.loading.assets import pack

    generation: dict[str, Any] = {}
    for item in args.set:
        generation.update(key_values(item, "--set"))
    training = None
    if args.training:
        try:
            with open(args.training, encoding="utf-8") as f:
                training = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CanvasError(f"{args.training}: cannot read the training summary ({e})") from None
    print(pack(args.run, args.out, args.name, args.base, generation, training))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from canvaslm.server.app import build_app

    if args.max_batch < 1 or args.max_queue < 1 or (args.max_draft_batch is not None and args.max_draft_batch < 1):
        raise CanvasError("--max-batch, --max-queue and --max-draft-batch must be >= 1")
    lm = load_model(args, large_batches=True)  # a server's batches pass the packed kernels' rows
    lm.require_tokenizer()  # the HTTP API takes text
    app = build_app(lm, args.served_model_name or args.model, max_batch=args.max_batch, max_queue=args.max_queue,
                    pin_settled=not args.no_pin_settled, decoding=args.decoding, max_draft_batch=args.max_draft_batch,
                    engine_thread=False)
    engine = app.state.engine
    # HTTP in a thread of its own; the engine loop here, in the thread that loaded the model, so that one thread
    # does all the torch work (`Engine.run` says why: twice the speed at one request on a 2-core CPU)
    http = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    http_thread = threading.Thread(target=http.run, name="canvaslm-http", daemon=True)

    def stop_http(*_: Any) -> None:  # SIGTERM: HTTP ends gracefully (open requests finish), then the engine
        http.should_exit = True

    def stop_engine_after_http() -> None:  # also when HTTP could not start (its port taken)
        http_thread.join()
        engine.stop()

    def start_http() -> None:  # once the engine takes requests
        http_thread.start()
        threading.Thread(target=stop_engine_after_http, name="canvaslm-stop", daemon=True).start()
        print(f"canvaslm: serving {args.model} ({lm.kind}) on http://{args.host}:{args.port}/v1", file=sys.stderr)

    signal.signal(signal.SIGTERM, stop_http)
    try:
        engine.run(started=start_http)
        http_thread.join()  # after an engine error, /health and every request report it until the server stops
    except KeyboardInterrupt:  # the engine aborted its requests
        pass
    finally:
        http.should_exit = True
        http_thread.join(timeout=10)
    return 0 if http.started else 1


if __name__ == "__main__":
    sys.exit(main())
