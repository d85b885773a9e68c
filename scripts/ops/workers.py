"""Show or scale a model's workers through the management API (the same code as ``ctl versions`` / ``ctl scale``).

    python -m scripts.ops.workers                          # every version of fashion_cnn: workers, pids, state, RSS
    python -m scripts.ops.workers fashion_cnn --workers 3  # min = max = 3 on the default version, wait, show
    python -m scripts.ops.workers fashion_cnn --workers 1 --version 2.0

Scaling always sends min_worker and max_worker together (a bare min_worker can
leave max at an unexpected value) with synchronous=true.
"""

from __future__ import annotations

import argparse
import sys

from scripts.ops import ctl


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.ops.workers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=ctl.MODEL)
    ctl.add_scale_args(p, workers_required=False)
    p.add_argument("--json", action="store_true", help="print the state as JSON (when not scaling)")
    ctl.add_connection_args(p)
    return p


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        args = get_args_parser().parse_args(args)
    return ctl.run(ctl.cmd_versions if args.workers is None else ctl.cmd_scale, args)


if __name__ == "__main__":
    sys.exit(main())
