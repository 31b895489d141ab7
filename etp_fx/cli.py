"""The ``etp-fx`` command."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="etp-fx", description="Structured pruning with Exponential Torque Pruning.")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="trace a model and print its coupled-channel groups")
    i.add_argument("spec", help="torchvision:NAME, timm:NAME, hf:ConfigClass[,key=value...], or package.module:factory")
    i.add_argument("--input-shape", default=None, help="comma-separated input shape, e.g. 1,3,224,224")
    i.add_argument("--max-rows", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .models import ModelSpecError, load_spec
    import etp_fx
    try:
        model, inputs = load_spec(args.spec, args.input_shape)
        g = etp_fx.trace(model, inputs)
    except (ModelSpecError, etp_fx.InputError, etp_fx.TraceError) as e:
        print(f"etp-fx: error: {e}", file=sys.stderr)
        return 2
    print(g.summary(max_rows=args.max_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
