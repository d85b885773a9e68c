"""Classify one or many images with the running TorchServe (the same code as ``ctl predict``).

    python -m scripts.ops.client examples/*.png
    python -m scripts.ops.client examples/coat.png --top-k 5 --no-tta --json

Reads the inference key from key_file.json (in --workdir, default: the config's
folder) and renews it through the token API when it has expired. Exit code 0
when every image was classified, 1 when one failed, 2 when TorchServe is unreachable.
"""

from __future__ import annotations

import argparse
import sys

from scripts.ops import ctl


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.ops.client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ctl.add_predict_args(p)
    ctl.add_connection_args(p)
    return p


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        args = get_args_parser().parse_args(args)
    return ctl.run(ctl.cmd_predict, args)


if __name__ == "__main__":
    sys.exit(main())
