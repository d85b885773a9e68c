"""``python -m scripts.ctl``: kept entry point; the real module is scripts/ops/ctl.py."""

import sys

from scripts.ops.ctl import get_args_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
