"""Measure throughput and latency (``make bench`` = ``python -m scripts.bench``): the
driver that packages the archives, starts TorchServe and runs the load (``run``), the
in-process ceilings of the raw models and handlers (``inproc``), the Markdown report
written to docs/benchmarks.md (``report``), and the baseline handlers it compares
against (``handlers``).
"""
