"""`lorakit serve`: an OpenAI-compatible HTTP server for a base model and named LoRA adapters."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
from pathlib import Path

from lorakit import dtypes
from lorakit.commands.compare import parse_adapters
from lorakit.errors import LorakitError
from lorakit.optional import require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, adapters, address, key and batching options."""
    parser.epilog = ("example:\n  lorakit serve --adapter sql=runs/sql/adapter --adapter chat=runs/chat/adapter\n"
                     "  then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-').chat.completions.create("
                     "model='sql', ...)\n")
    parser.add_argument("--model", default="embedded", help="base model: 'embedded', a local folder or a hub id")
    parser.add_argument("--dtype", default=None, help=f"{dtypes.accepted()} (default: as saved)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]FOLDER",
                        help="an adapter to serve under NAME (repeatable; NAME defaults to the folder's name)")
    parser.add_argument("--base-name", default="base", help="the request `model` value for the plain base model")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port; the line "
                        "'serving ... on http://HOST:PORT/v1' says which)")
    parser.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                        help="require this bearer key (default: $LORAKIT_API_KEY); also enables the admin endpoints")
    parser.add_argument("--context-length", type=int, default=None,
                        help="prompt + max_tokens limit (default: the model's max_position_embeddings, else 2048)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0, help="wait this long to batch requests")
    parser.add_argument("--max-batch", type=int, default=32, help="most requests per batch")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger request bodies get 413")


def context_length(model, override: int | None) -> int:
    """The request limit: the flag, else the model config's position limit, else 2048."""
    if override is not None:
        if override < 2:
            raise LorakitError(f"--context-length must be at least 2, got {override}")
        return override
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), bound as uvicorn binds one; an address that is taken or cannot be
    bound is one LorakitError. `run` binds before the model loads, so a taken port costs no loading time, and
    says it serves only once the address is its own."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a server just stopped (TIME_WAIT) is no obstacle
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        hint = "; another server is using it: choose another with --port" if error.errno == errno.EADDRINUSE else ""
        raise LorakitError(f"cannot serve on {host}:{port}: {error.strerror or error}{hint}") from None
    sock.listen(2048)  # uvicorn's backlog: connections queue from now on, while the model loads
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    """Bind the address, load the model and adapters, then serve until Ctrl-C."""
    require("fastapi", "serve", "lorakit serve")  # the server's routes are FastAPI's
    uvicorn = require("uvicorn", "serve", "lorakit serve")
    with bind(args.host, args.port) as sock:
        return serve(args, sock, uvicorn)


def _load_modality_adapter(model, adapters: dict[str, str]) -> str | None:
    """Load the one modality adapter among `adapters` onto the model (load_adapter: it is routed by the images a
    request carries, not by name); the name it is served as, or None."""
    from lorakit.adapters import load_adapter
    from lorakit.adapters.modality import is_modality_folder

    found = [name for name, folder in adapters.items() if is_modality_folder(folder)]
    if len(found) > 1:
        raise LorakitError(f"adapters {found[0]!r} and {found[1]!r} are both modality adapters; serve one (a "
                           "modality adapter holds several modalities)")
    if not found:
        return None
    load_adapter(model, adapters[found[0]])
    print(f"adapter {found[0]!r}: a modality adapter, for chats with image_url parts (its LoRA reaches their rows "
          "only)")
    return found[0]


def serve(args: argparse.Namespace, sock: socket.socket, uvicorn) -> int:
    """Load the model and adapters, then serve on the bound `sock` until Ctrl-C."""
    from lorakit.adapters.multi import add_adapter
    from lorakit.data.prompting import read_record
    from lorakit.infer.api import ServerConfig
    from lorakit.infer.server import create_app
    from lorakit.models import load_model, load_tokenizer, quiet_progress_bars

    quiet_progress_bars()
    model, tokenizer = load_model(args.model, dtype=args.dtype).eval(), load_tokenizer(args.model)
    formats = {}  # adapter name (None: the base) -> the prompt format its chat requests get
    base_record = read_record(args.model) if Path(args.model).is_dir() else None
    if base_record is not None:  # a full fine-tuning run's model folder: the format it was trained with
        formats[None] = base_record.prompt
        print(f"model {args.model}: chat requests to {args.base_name!r} get its recorded prompt format, "
              f"{base_record.prompt.describe(tokenizer)}")
    adapters = parse_adapters(args.adapter)
    modality = _load_modality_adapter(model, adapters)  # first: named adapters hook the layers it wraps
    for name, folder in adapters.items():
        if name != modality:
            add_adapter(model, name, folder)
        record = read_record(folder)
        if record is not None:
            formats[name] = record.prompt
            print(f"adapter {name!r}: chat requests get its recorded prompt format, {record.prompt.describe(tokenizer)}")
        else:
            print(f"adapter {name!r}: no lorakit_run.json (trained before lorakit recorded prompt formats); "
                  "chat requests get the tokenizer's chat template")
    cfg = ServerConfig(base_name=args.base_name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                       context_length=context_length(model, args.context_length), window_ms=args.batch_window_ms,
                       max_batch=args.max_batch)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.model} as {cfg.base_name!r} with adapters {list(parse_adapters(args.adapter))} "
          f"on http://{host}:{sock.getsockname()[1]}/v1", flush=True)  # the address is bound: this is true
    request_log = logging.getLogger("lorakit.serve")  # one line per request (infer/server.py)
    request_log.setLevel(logging.INFO)
    if not request_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        request_log.addHandler(handler)
    config = uvicorn.Config(create_app(model, tokenizer, cfg, formats, modality), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
    return 0
