"""The ``etp-fx`` command.

Each subcommand is one function ``run(args) -> exit code`` plus one function that adds its
arguments, registered in :data:`SUBCOMMANDS` with the :func:`subcommand` decorator. To add a
subcommand (``compress``, ``demo``, ``bench``), write the pair and decorate the runner::

    def _compress_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", help=SPEC_HELP)

    @subcommand("compress", help="...", arguments=_compress_arguments)
    def cmd_compress(args: argparse.Namespace) -> int:
        ...
        return 0

A user's mistake (unknown model spec, bad input shape, a file that cannot be read or written)
is reported as ``etp-fx CMD: error: ...`` on stderr with exit code 2, never as a traceback:
raise :class:`CLIError` for it (``ModelSpecError``, ``InputError``, ``TraceError`` and
``PlanError`` are reported the same way).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

__all__ = ["main", "build_parser", "subcommand", "SUBCOMMANDS", "Subcommand", "CLIError"]

SPEC_HELP = ("the model: torchvision:NAME, timm:NAME, hf:ConfigClass[,key=value...], "
             "package.module:factory or path/to/file.py:factory (random weights, nothing downloaded)")


class CLIError(Exception):
    """A mistake in the command line: printed as one line, exit code 2."""


@dataclass
class Subcommand:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    epilog: str | None = None


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, *, help: str, arguments: Callable[[argparse.ArgumentParser], None],
               description: str | None = None, epilog: str | None = None):
    """Register ``run(args) -> int`` as subcommand ``name`` (``arguments(parser)`` adds its options)."""
    def deco(run: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = Subcommand(name, help, arguments, run, description, epilog)
        return run
    return deco


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user asked for something that cannot be done, not a bug."""
    from .capture import InputError, TraceError
    from .models import ModelSpecError
    errors: list[type[BaseException]] = [CLIError, ModelSpecError, InputError, TraceError]
    try:
        from .plan import PlanError  # a plan that names unknown groups or units
        errors.append(PlanError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


# --- shared argument types ---------------------------------------------------------------------

def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v}")
    return v


def _check_writable(path: str | None, what: str) -> None:
    """Fail before the (slow) tracing when an output file cannot be written."""
    if path is None or path == "-":
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"cannot write {what} {path!r}: no such directory {parent!r}")
    if os.path.isdir(path):
        raise CLIError(f"cannot write {what} {path!r}: it is a directory")


def _write(path: str, what: str, write: Callable[[str], object]) -> None:
    try:
        write(path)
    except OSError as e:
        raise CLIError(f"cannot write {what} {path!r}: {e.strerror or e}") from None
    print(f"wrote {what} {path}", file=sys.stderr)


def _load_and_trace(spec: str, input_shape: str | None):
    import etp_fx
    from .models import load_spec
    model, inputs = load_spec(spec, input_shape)
    return etp_fx.trace(model, inputs)


# --- inspect -----------------------------------------------------------------------------------

def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help=SPEC_HELP)
    p.add_argument("--input-shape", metavar="SHAPE", default=None,
                   help="input shape, comma- or x-separated, e.g. 1,3,224,224 (default: the model's own)")
    p.add_argument("--max-rows", metavar="N", type=_nonneg_int, default=None,
                   help="show at most N groups in the table (the totals count all)")
    p.add_argument("--svg", metavar="PATH", help="write the group picture as SVG")
    p.add_argument("--html", metavar="PATH",
                   help="write the picture and a searchable table of groups as one HTML file")
    p.add_argument("--json", metavar="PATH",
                   help="write the groups, members, barriers and totals as JSON ('-': to stdout, "
                        "instead of the table)")


@subcommand(
    "inspect", help="trace a model and show its coupled-channel groups",
    arguments=_inspect_arguments,
    description="Trace a model (random weights) and print its coupled-channel groups: units, "
                "members, whether removal is exact, share of params and MACs, and the barriers "
                "(ops without a channel rule). Optionally draw the groups as SVG or HTML "
                "(no Graphviz needed) and dump them as JSON. See docs/inspect.md.",
    epilog="examples:\n"
           "  etp-fx inspect torchvision:resnet18 --input-shape 1,3,64,64\n"
           "  etp-fx inspect torchvision:resnet50 --svg resnet50.svg --html resnet50.html\n"
           "  etp-fx inspect hf:BertConfig,num_hidden_layers=2 --max-rows 10 --json groups.json\n"
           "  etp-fx inspect mymodels.py:make_net --input-shape 8,3,32,32")
def cmd_inspect(args: argparse.Namespace) -> int:
    from .render import write_html, write_svg
    from .report import graph_to_dict
    for path, what in ((args.svg, "SVG"), (args.html, "HTML"), (args.json, "JSON")):
        _check_writable(path, what)
    g = _load_and_trace(args.spec, args.input_shape)
    if args.json == "-":
        print(json.dumps(graph_to_dict(g), indent=1))
    else:
        print(g.summary(max_rows=args.max_rows))
    if args.svg:
        _write(args.svg, "SVG", lambda p: write_svg(g, p, title=args.spec))
    if args.html:
        _write(args.html, "HTML", lambda p: write_html(g, p, title=args.spec))
    if args.json and args.json != "-":
        def dump(p: str) -> None:
            with open(p, "w", encoding="utf-8") as f:
                json.dump(graph_to_dict(g), f, indent=1)
        _write(args.json, "JSON", dump)
    return 0


# --- main --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(
        prog="etp-fx",
        description="Structured pruning with Exponential Torque Pruning, on torch.export graphs.",
        epilog="run 'etp-fx COMMAND --help' for the options of one command")
    p.add_argument("--version", action="version", version=f"etp-fx {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for c in SUBCOMMANDS.values():
        sp = sub.add_parser(c.name, help=c.help, description=textwrap.fill(c.description or c.help, 88),
                            epilog=c.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        c.arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 a user's mistake)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed by argparse
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return SUBCOMMANDS[args.cmd].run(args)
    except _user_errors() as e:
        print(f"etp-fx {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("etp-fx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `etp-fx inspect ... | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
