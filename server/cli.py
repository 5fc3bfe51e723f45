"""The `flux-fill` command: `serve` (the API server, with its GPU workers unless --no-workers),
`worker` (GPU workers alone, on the --database of API nodes) and `predict` (one prediction offline)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from inference.cli import add_predict_parser

FLAG_NAMES = {"api_tokens": "--api-token", "admin_tokens": "--admin-token", "gpus": "--gpus"}


WORKER_PORT = 9100  # a worker node's /health and /metrics
EXIT_DATABASE_UNREACHABLE = 4
EXIT_SEGMENTER_MISSING = 6  # --segmenter names a folder that is not there, or lacks a file
NOT_WORKER_FLAGS = ("workers",)  # a worker node always runs workers


def add_settings_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from .settings import Settings

    for name, info in Settings.model_fields.items():
        if name in skip:
            continue
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS, "help": info.description}
        annotation = info.annotation
        if annotation is bool or annotation == (bool | None):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name in ("api_tokens", "admin_tokens"):
            kwargs["action"] = "append"
        elif name == "gpus":
            kwargs["type"] = lambda v: [x.strip() for x in v.split(",") if x.strip()]
        elif annotation in (int, float):
            kwargs["type"] = annotation
        p.add_argument(flag, **kwargs)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="Serve Replicate's predictions API for flux-fill-dev.",
                       description="Every option can also be set as FLUX_FILL_<NAME> in the environment.")
    add_settings_flags(p)
    p.set_defaults(func=serve)


def add_worker_parser(sub) -> None:
    p = sub.add_parser("worker", help="Run GPU workers for the API nodes of a shared --database.",
                       description="GPU workers that take predictions from the queue of a --database shared with "
                                   "`flux-fill serve --no-workers` API nodes, on this host or any other; /health and "
                                   f"/metrics on --port (default {WORKER_PORT}). Every option can also be set as "
                                   "FLUX_FILL_<NAME> in the environment.")
    add_settings_flags(p, skip=NOT_WORKER_FLAGS)
    p.set_defaults(func=worker)


def serve(args: argparse.Namespace) -> int:
    return run_node(args, None)


def worker(args: argparse.Namespace) -> int:
    return run_node(args, "worker")


def run_node(args: argparse.Namespace, role: str | None) -> int:
    from . import serving
    from .app import begin_shutdown, create_app
    from .datadir import EXIT_DATA_DIR_IN_USE, DataDirInUse, DataDirLock
    from .postgres import DatabaseUnreachable
    from .settings import Settings

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    if role == "worker":
        if "port" not in given and "FLUX_FILL_PORT" not in os.environ:
            given["port"] = WORKER_PORT
        given["workers"] = True
    settings = Settings(**given)
    settings.check_exposure()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.segmenter and settings.workers:
        from inference.errors import WeightsError
        from inference.segment import check_sources

        try:
            check_sources(settings.segmenter)  # each file named, before anything starts
        except WeightsError as exc:
            print(f"flux-fill {args.command}: {exc}", file=sys.stderr)
            return EXIT_SEGMENTER_MISSING
    # The data folder is locked, then the port bound, before the app reads its queue: a second
    # server on the same folder or port stops here, having changed nothing.
    lock = DataDirLock(settings.data_dir)
    try:
        lock.acquire()
    except DataDirInUse as exc:
        print(f"flux-fill {args.command}: {exc}", file=sys.stderr)
        return EXIT_DATA_DIR_IN_USE
    try:
        if settings.database and settings.database.startswith(("postgresql://", "postgres://")):
            from .postgres import check_reachable

            check_reachable(settings.database)  # in words, before a port is bound or a model loaded
        app = create_app(settings, data_lock=lock, role=role)
        serving.run(app, settings, on_exit=lambda: begin_shutdown(app), command=args.command)
    except DatabaseUnreachable as exc:
        print(f"flux-fill {args.command}: {exc}", file=sys.stderr)
        return EXIT_DATABASE_UNREACHABLE
    except serving.PortUnavailable as exc:
        print(f"flux-fill {args.command}: {exc.strerror}", file=sys.stderr)
        return serving.EXIT_PORT_UNAVAILABLE
    finally:
        lock.release()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flux-fill", description="FLUX.1 Fill [dev] with Replicate's API, locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_worker_parser(sub)
    add_predict_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
