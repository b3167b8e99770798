"""The `sine` command: each subcommand (one module of `sine_cli.commands`, its parser beside its
handler) parses its arguments and calls the library.

Nothing heavy is imported up front: `sine serve` loads the service and never torch. Where an
install leaves a part out (the serving image has no `model_export`), its commands are listed
and say what they need.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .commands import COMMANDS

# what a serving-only install (the container image) leaves out
OPTIONAL_PARTS = {"torch", "onnx", "model_export", "index_builder", "devtools", "matplotlib",
                  "pyarrow"}


def _absent(sub: Any, module: Any, missing: str) -> None:
    """A command whose parser needs a part this install lacks: listed, and says so."""
    name = module.__name__.rsplit(".", 1)[1].replace("_", "-")
    p = sub.add_parser(name, help=f"(needs {missing}, which this install lacks)")
    p.set_defaults(func=lambda a: _needs(name, missing), absent=True)


def _needs(command: str, missing: str) -> int:
    print(f"error: `sine {command}` needs {missing}, which this install lacks (the serving "
          "image holds `serve` and `fetch-bundle` only; pip install -e '.[train]' for the rest)",
          file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sine", description="SINE candidate retrieval: train, "
                                "evaluate, export and serve a sparse-interest recommender.")
    from service.version import __version__
    p.add_argument("--version", action="version", version=f"sine-retrieval {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        try:
            module.add(sub)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in OPTIONAL_PARTS:
                raise
            _absent(sub, module, e.name or "a part of the project")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "absent", False):    # an absent command's flags are unknown
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        hint = ("; the last completed epoch is in last.pt (use --resume)"
                if args.command == "train" else "")
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in OPTIONAL_PARTS:
            raise
        return _needs(args.command, e.name or "a part of the project")
    except Exception as e:
        from index_builder.bundle import SineError  # every user-facing error derives from it

        if not isinstance(e, SineError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
