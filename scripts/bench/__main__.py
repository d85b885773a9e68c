"""``python -m scripts.bench``: the benchmark driver in scripts/bench/run.py."""

from scripts.bench.run import get_args_parser, main

if __name__ == "__main__":
    parser = get_args_parser()
    parser.prog = "python -m scripts.bench"
    main(parser.parse_args())
