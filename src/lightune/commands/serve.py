"""`lightune serve`: serve finished adapter runs of one base model over HTTP, on a socket bound before anything
loads."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import socket
import sys

from ..config import DEVICES, INFERENCE_PRECISIONS
from ..errors import ConfigError
from ..logs import silence_library_output
from .options import parse_list


def add(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve runs over HTTP: JSON API and a web page, many adapters on one base",
        description="Serve one or more finished adapter runs (LoRA, DoRA, IA3, ...) of the same base model: one "
                    "base model in memory, one adapter per run, chosen per request; concurrent requests share forward "
                    "passes. SIGTERM or Ctrl-C answers the requests in flight, then exits.")
    serve.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                       help="finished adapter run directories (lora, qlora, dora, ia3, ...; one peft kind)")
    serve.add_argument("--name", action="append", dest="names", metavar="NAME",
                       help="adapter name, once per RUN_DIR in order (default: each run directory's name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--allowed-hosts", type=parse_list, default=[], metavar="HOSTS",
                       help="comma-separated Host header values to answer besides localhost, 127.0.0.1 and [::1] "
                            "(each with any port), e.g. lightune.example.com,*.corp.example; on a non-loopback "
                            "--host: the only ones answered (default: any)")
    serve.add_argument("--device", choices=DEVICES, default="auto")
    serve.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    serve.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="auto",
                       help="the weights' dtype: auto (bf16 on GPUs that support it, else fp32), fp32 or bf16")
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile the passes of one adapter (CUDA graphs at fixed padded widths on CUDA; "
                            "each new shape compiles on its first request; passes mixing adapters run eagerly)")
    serve.add_argument("--batching", choices=("on", "off"), default="on",
                       help="on: concurrent requests share forward passes, rows of several LoRA adapters in one "
                            "pass; off: one request at a time, switching adapters per request (default on)")
    serve.add_argument("--batch-wait-ms", type=float, default=2.0,
                       help="with batching: how long a pass waits for more requests once one arrives (default 2)")
    serve.add_argument("--max-texts", type=int, default=64, help="most texts per request (default 64)")
    serve.add_argument("--max-chars", type=int, default=5000, help="most characters per text (default 5000)")
    serve.add_argument("--max-body-bytes", type=int, default=1_000_000,
                       help="largest request body in bytes (default 1000000)")
    serve.add_argument("--max-queue", type=int, default=32,
                       help="most prediction requests admitted at once, running or waiting; one more gets 503 "
                            "with Retry-After (default 32)")
    serve.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="the most seconds a client may take to send a request body; 408 after them (default 30)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM or Ctrl-C, the most seconds to finish the requests in flight; those still "
                            "running are then answered 503 and the server exits (default 30)")
    serve.add_argument("--max-adapters", type=int, default=16,
                       help="most adapters loaded at once, those given here included (default 16)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer API_KEY' on every endpoint but / and "
                                         "/health (default: $LIGHTUNE_API_KEY; prefer it, the process list shows "
                                         "arguments to every user)")
    serve.add_argument("--allow-adapter-loading", metavar="ROOT",
                       help="let clients load (POST /adapters) and unload (DELETE) adapters, from runs inside ROOT "
                            "only (default: off)")
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    silence_library_output()
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    for flag in ("batch_size", "max_texts", "max_chars", "max_body_bytes", "max_queue", "max_adapters"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.batch_wait_ms <= 1000:
        raise ConfigError(f"--batch-wait-ms must be between 0 and 1000, got {args.batch_wait_ms:g}")
    for flag in ("body_timeout", "shutdown_timeout"):
        if not 0 < getattr(args, flag) <= 3600:  # NaN fails too
            raise ConfigError(f"--{flag.replace('_', '-')} must be more than 0 and at most 3600 (seconds), got "
                              f"{getattr(args, flag):g}")
    api_key = api_key_of(args)
    sock = bound_socket(args.host, args.port)  # before anything loads: a port in use fails at once
    log_handler = _server_log()
    try:
        import uvicorn

        from ..serving import Access, AdapterRoot, Batching, GracefulServer, Limits, create_app, is_loopback, \
            trusted_hosts

        root = AdapterRoot(args.allow_adapter_loading) if args.allow_adapter_loading else None
        access = Access(trusted_hosts(args.host, args.allowed_hosts), api_key, root)
        if api_key is None and not is_loopback(args.host):
            print(f"lightune: warning: serving on {args.host} without an API key: anyone who can reach this port "
                  f"can use the server; set LIGHTUNE_API_KEY", file=sys.stderr)
        registry = build_registry(args.run_dirs, args.names, args.device, args.batch_size, args.max_adapters,
                                  args.precision, args.compile)
        limits = Limits(args.max_texts, args.max_chars, args.max_body_bytes, args.max_queue, args.body_timeout)
        app = create_app(registry, limits, access, Batching(args.batching == "on", args.batch_wait_ms))
        print(f"serving {', '.join(registry.names())} on {registry.base_model} ({registry.device}) at "
              f"http://{args.host}:{args.port}/  (API docs: /docs)", file=sys.stderr)
        GracefulServer(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=args.shutdown_timeout)) \
            .run(sockets=[sock])
    finally:
        logging.getLogger("lightune.serve").removeHandler(log_handler)
        sock.close()
    return 0


def _server_log() -> logging.Handler:
    """The server's own log (adapters loaded, with their paths; errors) on standard error, like uvicorn's."""
    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    logger = logging.getLogger("lightune.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def build_registry(run_dirs: list[str], names: list[str] | None, device: str = "auto", batch_size: int = 32,
                   max_adapters: int = 16, precision: str = "auto", compile: bool = False):
    """An AdapterRegistry with one adapter per run directory; ConfigError/ModelError for bad arguments."""
    from ..serving import AdapterRegistry, adapter_name_for

    if names and len(names) != len(run_dirs):
        raise ConfigError(f"--name was given {len(names)} time(s) for {len(run_dirs)} run directories; "
                          "give one name per run directory or none")
    names = names or [adapter_name_for(d) for d in run_dirs]
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter names must be unique, got {', '.join(names)}; use --name")
    if len(run_dirs) > max_adapters:
        raise ConfigError(f"{len(run_dirs)} run directories but --max-adapters is {max_adapters}")
    registry = AdapterRegistry(device=device, batch_size=batch_size, max_adapters=max_adapters, precision=precision,
                               compile=compile)
    for name, run_dir in zip(names, run_dirs):
        registry.add(name, run_dir)
    return registry


def bound_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it); ConfigError with one line when that is not possible."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        # the address's own protocol (IPPROTO_TCP), not 0: asyncio sets TCP_NODELAY only on accepted sockets whose
        # proto says TCP, and without it every response after the first on a kept-alive connection waits ~40 ms
        # (Nagle's algorithm against the client's delayed ACK)
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "the port is in use; stop the other server or choose another --port" \
            if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise ConfigError(f"cannot listen on {where}: {reason}") from None
    return sock


def api_key_of(args: argparse.Namespace) -> str | None:
    """--api-key, else $LIGHTUNE_API_KEY (unset or empty: no key)."""
    key = args.api_key if args.api_key is not None else os.environ.get("LIGHTUNE_API_KEY") or None
    if key is not None and not re.fullmatch(r"[\x21-\x7e]+", key):
        raise ConfigError("the API key must be printable ASCII without spaces (it is sent in an HTTP header)")
    return key
