"""python -m scripts.demo: the browser demo (see scripts/demo/app.py)."""

import sys

from scripts.demo.app import main

if __name__ == "__main__":
    sys.exit(main())
