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

A user's mistake (unknown model spec, bad input shape, a bad ``--ratio``, an unreachable
target, a file that cannot be read or written) is reported as ``etp-fx CMD: error: ...``, one
line on stderr, with exit code 2, never as a traceback: raise :class:`CLIError` for it. Every
other :class:`etp_fx.Error` raised anywhere below (``ModelSpecError``, ``InputError``,
``SelectionError``, ``LoadError``, ...) is reported the same way. Output paths are checked for
writability before any work starts.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .demo import DemoConfig, run_demo
from .errors import Error
from .graph.describe import graph_to_dict
from .graph.trace import trace
from .io import load, save
from .models import load_spec, parse_shape
from .regularise.selection import Selection, selection_from
from .render import write_html, write_svg
from .surgery.compress import compress
from .version import __version__

__all__ = ["main", "build_parser", "subcommand", "SUBCOMMANDS", "Subcommand", "CLIError"]

SPEC_HELP = ("the model: torchvision:NAME, timm:NAME, hf:ConfigClass[,key=value...], "
             "package.module:factory or path/to/file.py:factory (random weights, nothing downloaded)")


class CLIError(Error):
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
    return (CLIError, Error)


def _one_line(e: BaseException) -> str:
    """The message on one line: an error's advice may sit on a line of its own."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) \
        or type(e).__name__


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
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write {what} {path!r}: the directory {parent!r} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CLIError(f"cannot write {what} {path!r}: the file exists and is read-only")


def _check_folder_writable(path: str, what: str) -> None:
    """An output folder: an existing writable directory, or one that can be created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"cannot write {what} {path!r}: it exists and is not a directory")
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise CLIError(f"cannot write {what} {path!r}: {ancestor!r} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write {what} {path!r}: {ancestor!r} is not writable")


def _write(path: str, what: str, write: Callable[[str], object]) -> None:
    try:
        write(path)
    except OSError as e:
        raise CLIError(f"cannot write {what} {path!r}: {e.strerror or e}") from None
    print(f"wrote {what} {path}", file=sys.stderr)


def _load_and_trace(spec: str, input_shape: str | None):
    model, inputs = load_spec(spec, input_shape)
    return trace(model, inputs)


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


# --- demo --------------------------------------------------------------------------------------

def _demo_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--epochs", type=_nonneg_int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    p.add_argument("--strength", type=float, default=d.strength,
                   help="a fixed ETP strength, for experts; by default the MACs target "
                        "(--target-macs) drives the strength")
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help=f"remove units whose norm is below this share of their group's largest (default {d.threshold})")
    p.add_argument("--target-macs", type=float, default=None, metavar="SHARE",
                   help="instead of the threshold: keep this share of the MACs, e.g. 0.25")
    p.add_argument("--out", default=d.out, help=f"output folder (default ./{d.out})")
    p.add_argument("--seed", type=_nonneg_int, default=d.seed)


@subcommand("demo", help="train a small CNN on bundled digits with ETP, compress it, show the result",
            arguments=_demo_arguments,
            description="The main job on its embedded default: trains a small VGG-style CNN on "
                        "scikit-learn's bundled digits with the ETP regulariser (offline, about a "
                        "minute on 2 CPUs), compresses it into a dense smaller torch.fx graph, "
                        "prints params, MACs, test accuracy and CPU latency before and after, "
                        "writes model.pt2, norms.png, groups.svg/html and report.json, and "
                        "reloads model.pt2 in a fresh process.")
def cmd_demo(args: argparse.Namespace) -> int:
    if args.target_macs is not None and not 0 < args.target_macs <= 1:
        raise CLIError(f"--target-macs is a share of the MACs to keep, in (0, 1]; got {args.target_macs}")
    if args.epochs < 1:
        raise CLIError("--epochs must be at least 1")
    _check_folder_writable(args.out, "output folder")
    cfg = DemoConfig(epochs=args.epochs, strength=args.strength, threshold=args.threshold,
                     target_macs=args.target_macs, out=args.out, seed=args.seed)
    run_demo(cfg)
    return 0


# --- compress ----------------------------------------------------------------------------------

def _compress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=SPEC_HELP + "; or a .pt2 file written by etp_fx")
    p.add_argument("--weights", metavar="FILE", help="a state dict (torch.save) to load into the model spec")
    p.add_argument("--input-shape", metavar="SHAPE", default=None, help="input shape, e.g. 1,3,224,224")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-macs", type=float, metavar="SHARE", help="keep this share of the MACs, in (0, 1]")
    target.add_argument("--target-params", type=float, metavar="SHARE", help="keep this share of the parameters")
    target.add_argument("--ratio", type=float, help="remove this share of the units of every group, in [0, 1)")
    target.add_argument("--threshold", type=float, help="remove units whose norm is at most this")
    p.add_argument("--relative", action="store_true", help="--threshold is relative to each group's largest unit")
    p.add_argument("--round-to", type=_nonneg_int, default=None, metavar="N", help="keep widths multiple of N where possible")
    p.add_argument("--allow-approximate", action="store_true", help="also prune groups whose removal is approximate")
    p.add_argument("--out", "-o", required=True, help="where to write the compressed .pt2 (a .json report goes beside it)")


def _selection(args: argparse.Namespace) -> Selection:
    """The one selection the command line asks for, checked before any work starts."""
    options = {k: v for k, v in (("relative", args.relative if args.threshold is not None else None),
                                 ("round_to", args.round_to)) if v}
    try:
        return selection_from(target_macs=args.target_macs, target_params=args.target_params,
                              ratio=args.ratio, threshold=args.threshold, **options)
    except Error as e:  # name the flag: "ratio must lie in [0, 1)" -> "--ratio 1.5: ..."
        flag = next((f"--{k.replace('_', '-')} {v:g}" for k, v in (
            ("target_macs", args.target_macs), ("target_params", args.target_params),
            ("ratio", args.ratio), ("threshold", args.threshold)) if v is not None), "")
        raise CLIError(f"{flag}: {e}" if flag else str(e)) from None


def _report_path(out: str) -> str:
    """The JSON report written beside the .pt2 file."""
    return os.path.splitext(out)[0] + ".json"


@subcommand("compress", help="compress a model to a target and write a .pt2 with a report",
            arguments=_compress_arguments,
            description="Select units by norm (magnitude of the current weights) to meet a "
                        "target, remove them, verify the result against the zeroed original and "
                        "write the dense smaller model as .pt2 plus a JSON report. For a model "
                        "trained with ETP, most removed units are already zero.")
def cmd_compress(args: argparse.Namespace) -> int:
    _check_writable(args.out, ".pt2 file")
    _check_writable(_report_path(args.out), "report")
    selection = _selection(args)
    if args.model.endswith(".pt2"):
        if args.input_shape is None:
            raise CLIError("give --input-shape for a .pt2 model")
        model = load(args.model)
        inputs = torch.randn(*parse_shape(args.input_shape, ()))
    else:
        model, inputs = load_spec(args.model, args.input_shape)
        model.eval()
    if args.weights:
        try:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CLIError(f"--weights {args.weights!r}: no such file") from None
        except Exception as e:  # noqa: BLE001 - a corrupt file is the user's to fix
            raise CLIError(f"--weights {args.weights!r} is not a readable state dict: {e}") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CLIError(f"--weights {args.weights!r} does not fit {args.model}: {str(e).splitlines()[0]}") from None
    small = compress(model, inputs, selection, allow_approximate=args.allow_approximate)
    rep = small.meta["etp_report"]
    _write(args.out, ".pt2 file", lambda p: save(small, p))
    _write(_report_path(args.out), "report",
           lambda p: Path(p).write_text(json.dumps(rep, indent=1, default=str)))
    print(f"params {rep['params_before']:,} -> {rep['params_after']:,}; "
          f"MACs {rep['macs_before']:,} -> {rep['macs_after']:,} "
          f"({rep['macs_before'] / max(rep['macs_after'], 1):.2f}x fewer); "
          f"{len(rep['groups'])} groups changed; verified max |diff| {rep.get('max_abs_diff', 0):.2g}")
    return 0


# --- bench -------------------------------------------------------------------------------------

BENCHMARKS = ("zoo_sweep", "trace_speed", "compress_speed", "latency", "regulariser_overhead", "quality")


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=BENCHMARKS, help="which benchmark (each writes its results to docs/)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark, e.g. --quick")


@subcommand("bench", help="run one of the benchmarks in benchmarks/ (from a clone of the repository)",
            arguments=_bench_arguments)
def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark as ``python -m benchmarks.NAME``; its exit code is ours (non-zero when
    a cell failed, unless ``--allow-failures`` is passed on to it)."""
    root = os.getcwd()
    if not any(os.path.exists(os.path.join(root, "benchmarks", args.name + ext))
               for ext in (".py", "/__main__.py")):
        raise CLIError(f"benchmarks/{args.name} not found under {root}: run etp-fx bench from a "
                       f"clone of the etp_fx repository")
    argv, path = sys.argv, list(sys.path)
    sys.path.insert(0, root)
    sys.argv = [f"benchmarks.{args.name}", *args.rest]
    try:
        runpy.run_module(f"benchmarks.{args.name}", run_name="__main__")
    except SystemExit as e:  # the benchmark's sys.exit(main())
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = argv, path
    return 0


# --- main --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
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
        print(f"etp-fx {args.cmd}: error: {_one_line(e)}", file=sys.stderr)
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
