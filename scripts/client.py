"""``python -m scripts.client``: kept entry point; the real module is scripts/ops/client.py."""

import sys

from scripts.ops.client import get_args_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
