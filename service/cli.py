"""The ``attnserve`` command and its subcommands.

Each subcommand imports its heavy dependencies only when it runs, so that the serving image
(``attnserve serve``) never imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_TRAIN_MINUTES = 5.0  # `make run`'s budget: the default model trains in five minutes on two cores


def _train(args: argparse.Namespace) -> int:
    from model.config import preset
    from model.data import load_corpus, load_shakespeare
    from model.train import train

    cfg = preset(args.config)
    docs = load_corpus(args.corpus) if args.corpus else load_shakespeare()
    minutes = None if args.steps else args.minutes
    metrics = train(cfg, args.out, docs, minutes=minutes, steps=args.steps, resume=args.resume, device=args.device)
    sys.stdout.write(
        f"validation: {metrics['val_bits_per_byte']:.4f} bits per byte after {metrics['steps']} steps "
        f"({metrics['train_seconds']:.0f}s, {metrics['tokens_per_second']:,} tokens/s)\n"
        f"sample: {metrics['sample']!r}\n"
        f"wrote {args.out}/checkpoint.pt, config.json, tokenizer.json, metrics.json, loss.png\n"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from export.onnx_export import ExportError, export_model, summary

    try:
        report = export_model(args.checkpoint, args.out, int8=args.int8, fp16=args.fp16, name=args.name)
    except ExportError as e:
        sys.stderr.write(f"export failed: {e}\n")
        return 1
    sys.stdout.write(summary(report) + f"\nwrote {args.out}\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from service.config import ServerConfig
    from service.runtime import CudaUnavailableError, ModelDirError
    from service.server import serve

    try:
        config = ServerConfig.from_sources(args)
        asyncio.run(serve(config))
    except (ValueError, ModelDirError, CudaUnavailableError) as e:
        sys.stderr.write(f"attnserve serve: {e}\n")
        return 2
    return 0


def _client(args: argparse.Namespace) -> int:
    from service.client import main

    return main(args)


def _bench(args: argparse.Namespace) -> int:
    import importlib
    import json

    bench = importlib.import_module(f"bench.{args.bench}")
    skipped = ("command", "bench", "func", "json", "log_level", "log_format")
    options = {k: v for k, v in vars(args).items() if k not in skipped}
    result = bench.run(**options)
    sys.stdout.write(bench.table(result) + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnserve", description="Train, export and serve a compact transformer.")
    from service.logs import FORMATS, LEVELS

    env = os.environ
    level, fmt = env.get("ATTNSERVE_LOG_LEVEL") or "INFO", env.get("ATTNSERVE_LOG_FORMAT") or "text"
    p.add_argument(
        "--log-level", type=str.upper, choices=LEVELS, default=level.upper(),
        help=f"least severe records logged (default {level.upper()}; env ATTNSERVE_LOG_LEVEL)",
    )  # fmt: skip
    p.add_argument(
        "--log-format", choices=FORMATS, default=fmt,
        help=f"text, or one JSON object a line for a log pipeline (default {fmt}; env ATTNSERVE_LOG_FORMAT)",
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a text corpus")
    t.add_argument("--out", type=Path, required=True, help="folder for the checkpoint and its companions")
    t.add_argument("--corpus", type=Path, nargs="+", help="UTF-8 text files or folders (default: Shakespeare)")
    t.add_argument("--config", default="small", help="model preset: small (default) or tiny")
    t.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_TRAIN_MINUTES,
        help=f"training time budget (default {DEFAULT_TRAIN_MINUTES:g})",
    )
    t.add_argument("--steps", type=int, help="train exactly this many steps instead of a time budget")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="export a checkpoint to an ONNX model directory, verified")
    e.add_argument("--checkpoint", type=Path, required=True, help="training output folder (checkpoint.pt, ...)")
    e.add_argument("--out", type=Path, required=True, help="model directory to write")
    e.add_argument("--int8", action="store_true", help="add dynamically quantized int8 graphs (CPU)")
    e.add_argument("--fp16", action="store_true", help="add fp16 graphs (CUDA); parity checked where a GPU is usable")
    e.add_argument("--name", default="default", help="model name recorded in the directory (default: default)")
    e.set_defaults(func=_export)

    from service.config import ServerConfig

    s = sub.add_parser("serve", help="serve a model directory over gRPC")
    s.add_argument(
        "--config",
        type=Path,
        default=None,
        help='a TOML file of these settings by name (port = 50051, api_keys_file = "keys"; paths relative to '
        "the file); flags and ATTNSERVE_* variables take precedence (env ATTNSERVE_CONFIG)",
    )
    ServerConfig.add_arguments(s)
    s.set_defaults(func=_serve)

    # Defaults from the environment, so that a probe in the server's container (its HEALTHCHECK)
    # dials the port the server listens on (ATTNSERVE_PORT) and speaks TLS where the server does.
    address = env.get("ATTNSERVE_CLIENT_ADDRESS") or f"localhost:{env.get('ATTNSERVE_PORT') or 50051}"
    c = sub.add_parser("client", help="call a running server")
    c.add_argument(
        "--address",
        default=address,
        help=f"server address (default {address}: ATTNSERVE_CLIENT_ADDRESS, else localhost:ATTNSERVE_PORT)",
    )
    c.add_argument("--timeout", type=float, default=30.0, help="seconds before giving up (default 30)")
    c.add_argument(
        "--retries", type=int, default=2,
        help="times a call the server refused before any work (UNAVAILABLE, RESOURCE_EXHAUSTED) is tried again, "
        "after what the server says (grpc-retry-pushback-ms), else backing off from 0.1 s (default 2, at most 4)",
    )  # fmt: skip
    for flag, what in (
        ("ca", "speak TLS, trusting this CA (PEM) for the server's certificate"),
        ("cert", "client certificate (PEM), for mutual TLS"),
        ("key", "client private key (PEM), for mutual TLS"),
    ):
        var = f"ATTNSERVE_CLIENT_TLS_{flag.upper()}"
        c.add_argument(f"--tls-{flag}", type=Path, default=env.get(var) or None, help=f"{what} (env {var})")
    c.add_argument(
        "--tls-server-name",
        default=env.get("ATTNSERVE_CLIENT_TLS_SERVER_NAME") or None,
        help="name to check the server's certificate against (env ATTNSERVE_CLIENT_TLS_SERVER_NAME)",
    )
    c.add_argument(
        "--api-key",
        default=env.get("ATTNSERVE_CLIENT_API_KEY") or None,
        help="key sent with every call, for a server with --api-keys-file (env ATTNSERVE_CLIENT_API_KEY, "
        "which keeps it out of the process list)",
    )
    csub = c.add_subparsers(dest="client_command", required=True)
    ce = csub.add_parser("encode", help="embeddings of texts")
    ce.add_argument("texts", nargs="+")
    ce.add_argument("--pooling", choices=["mean", "last"], default="mean")
    ce.add_argument("--normalize", action="store_true", help="unit-length vectors")
    cut_help = "a text over the model's context: refused (error, the default), or its end or start dropped"
    ce.add_argument("--truncation", choices=["error", "end", "start"], default="error", help=cut_help)
    priority_help = "which work the model does first: high, normal or low (default: the client's, else normal)"
    ce.add_argument("--priority", choices=["high", "normal", "low"], help=priority_help)
    ca = csub.add_parser("attention", help="attention map of a text")
    ca.add_argument("text")
    ca.add_argument("--layers", type=int, nargs="*", help="layers to fetch (default all)")
    ca.add_argument("--heads", type=int, nargs="*", help="heads to fetch (default all)")
    ca.add_argument("--png", type=Path, help="write a heatmap per layer and head into this folder")
    ca.add_argument("--truncation", choices=["error", "end", "start"], default="error", help=cut_help)
    ca.add_argument("--priority", choices=["high", "normal", "low"], help=priority_help)
    cg = csub.add_parser("generate", help="continue a prompt")
    cg.add_argument("prompt")
    cg.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    cg.add_argument("--max-new-tokens", type=int, default=64)
    cg.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    cg.add_argument("--top-k", type=int, default=40)
    cg.add_argument("--top-p", type=float, default=1.0)
    cg.add_argument("--seed", type=int)
    cg.add_argument("--stop", nargs="*", help="stop sequences")
    cg.add_argument(
        "--truncation",
        choices=["error", "start"],
        default="error",
        help="a prompt with no room for --max-new-tokens: generated as far as the context allows, refused if it "
        "fills it (error, the default), or its first tokens dropped (start)",
    )
    cg.add_argument("--attention", action="store_true", help="show what each token attended to most (last layer)")
    cg.add_argument("--priority", choices=["high", "normal", "low"], help=priority_help)
    csub.add_parser("info", help="model and server information")
    ch = csub.add_parser("health", help="exit 0 when the server is SERVING (for container health checks)")
    ch.add_argument("--service", default="", help="service name to ask about (default: the server as a whole)")
    c.set_defaults(func=_client)

    b = sub.add_parser("bench", help="benchmarks that print their figures")
    bsub = b.add_subparsers(dest="bench", required=True)
    br = bsub.add_parser("runtime", help="ONNX Runtime against PyTorch eager on the same weights")
    br.add_argument("--model-dir", type=Path, required=True)
    br.add_argument("--checkpoint", type=Path, help="training folder for the PyTorch side (default: the exported one)")
    br.add_argument("--seconds", type=float, default=1.0, help="time spent per case (default 1)")
    br.add_argument("--json", type=Path, help="also write the figures here")
    br.set_defaults(func=_bench)
    be = bsub.add_parser("encode", help="gRPC load (closed and open loop) against the in-process limit")
    be.add_argument("--model-dir", type=Path, required=True)
    be.add_argument("--tokens", type=int, default=64, help="tokens per text (default 64)")
    be.add_argument("--concurrency", type=int, default=32, help="closed-loop concurrency (default 32)")
    be.add_argument("--seconds", type=float, default=10.0, help="duration of each load (default 10)")
    be.add_argument("--json", type=Path, help="also write the figures here")
    be.set_defaults(func=_bench)
    bg = bsub.add_parser("generate", help="streaming generation load against the in-process decode limit")
    bg.add_argument("--model-dir", type=Path, required=True)
    bg.add_argument("--seconds", type=float, default=15.0, help="duration of each load (default 15)")
    bg.add_argument("--json", type=Path, help="also write the figures here")
    bg.set_defaults(func=_bench)
    for on_device in (be, bg):
        on_device.add_argument(
            "--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs (default cpu)"
        )
        on_device.add_argument(
            "--variant", choices=["fp32", "fp16"], default="fp32", help="which graphs (default fp32)"
        )
    bs = bsub.add_parser("split", help="the server on one core, its load on the other, against the 1-core limit")
    bs.add_argument("--model-dir", type=Path, required=True)
    bs.add_argument("--seconds", type=float, default=5.0, help="duration of each encode load (default 5)")
    bs.add_argument("--rounds", type=int, default=3, help="interleaved rounds of attnserve and the peer (default 3)")
    bs.add_argument("--concurrency", type=int, default=32, help="closed-loop concurrency (default 32)")
    bs.add_argument("--profile", dest="with_profile", action="store_true", help="sample the server with py-spy")
    bs.add_argument(
        "--designs", action="store_true", help="also the other designs: bench.designs (thread-pool server, grpclib)"
    )
    bs.add_argument("--json", type=Path, help="also write the figures here")
    bs.set_defaults(func=_bench)
    bo = bsub.add_parser("observe", help="what API keys, the access log and traces cost a call, on the server's core")
    bo.add_argument("--model-dir", type=Path, required=True)
    bo.add_argument("--rounds", type=int, default=8, help="rounds of the four ways (default 8)")
    bo.add_argument("--calls", type=int, default=2000, help="calls a measurement (default 2000)")
    bo.add_argument("--record-format", choices=["json", "text"], default="json", help="the access log's (default json)")
    bo.add_argument("--json", type=Path, help="also write the figures here")
    bo.set_defaults(func=_bench)
    bl = bsub.add_parser(
        "reliability", help="overload at a multiple of capacity, new models under load, and a soak of mixed traffic"
    )
    bl.add_argument("--model-dir", type=Path, required=True)
    bl.add_argument("--part", choices=["all", "overload", "generate", "priority", "reload", "soak"], default="all")
    bl.add_argument("--seconds", type=float, default=15.0, help="duration of the overload (default 15)")
    bl.add_argument("--overload-factor", type=float, default=3.0, help="offered load / capacity (default 3)")
    bl.add_argument("--texts-per-request", type=int, default=16, help="texts in each overload call (default 16)")
    bl.add_argument("--deadline", type=float, default=2.0, help="each overload call's deadline, s (default 2)")
    bl.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens a Generate overload call asks for (default 64)"
    )
    bl.add_argument(
        "--generate-deadline", type=float, default=0.5, help="each Generate overload call's deadline, s (default 0.5)"
    )
    bl.add_argument("--soak-seconds", type=float, default=600.0, help="duration of the soak (default 600)")
    bl.add_argument("--reloads", type=int, default=6, help="new models loaded under load (default 6)")
    bl.add_argument(
        "--reload-seconds", type=float, default=42.0, help="duration of the load they are loaded under (default 42)"
    )
    bl.add_argument(
        "--priority-rounds",
        type=int,
        default=2,
        help="rounds of bulk and interactive work, each without and with priorities, --seconds each (default 2)",
    )
    bl.add_argument("--json", type=Path, help="also write the figures here")
    bl.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from service.logs import configure

    try:
        configure(args.log_level, args.log_format)
    except ValueError as e:  # from the environment: argparse checks only what was given as flags
        parser.error(str(e))
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
