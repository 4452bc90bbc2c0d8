"""The ``beagled`` command line: ``serve``, ``check-config``, ``demo`` (``beaglectl`` lives in ``ctl``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from beagled import __version__, config, logs, secrets
from beagled.errors import BeagledError, ConfigError


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beagled", description="Make a writing model speak more like its user.")
    p.add_argument("--version", action="version", version=f"beagled {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", help="config file (default: $BEAGLED_CONFIG, else ./config.toml)")
    check = sub.add_parser("check-config", help="validate a config and print the effective settings")
    check.add_argument("--config", help="config file (default: $BEAGLED_CONFIG, else ./config.toml)")
    demo = sub.add_parser("demo", help="the whole job end to end on a tiny local model")
    demo.add_argument("--state-dir", help="keep the demo's state here (default: a temporary directory)")
    demo.add_argument("--jobs", type=int, default=5, help="how many training jobs the demo loop drives")
    demo.add_argument("--backend", action="append", help="backend(s) to use (default: mlx, then peft)")
    return p


def beagled_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            cfg = config.load(args.config)
            secrets.vllm_api_key(cfg.reload.vllm.api_key, cfg.reload.vllm.api_key_file)  # readable?
            print(f"# effective settings ({cfg.source or 'built-in defaults'}; secrets masked)")
            print(config.to_toml(cfg))
            return 0
        if args.command == "serve":
            cfg = config.load(args.config)
            logs.setup(cfg.daemon.log_format, cfg.daemon.log_level)
            from beagled.daemon import serve

            return serve(cfg)
        if args.command == "demo":
            missing = [m for m in ("mlx", "mlx_lm", "tokenizers") if not _importable(m)]
            if missing:  # the tiny model is built with MLX: nothing to demo without it
                print(
                    f"beagled demo needs the MLX backend ({', '.join(missing)} not installed): "
                    "pip install 'beagled[mlx]'",
                    file=sys.stderr,
                )
                return 2
            from beagled.demo import run_demo

            return run_demo(state_dir=args.state_dir, jobs=args.jobs, backends=args.backend)
    except ConfigError as e:
        print(f"beagled: bad config: {e}", file=sys.stderr)
        return 2
    except BeagledError as e:
        print(f"beagled: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2
