"""Everything around the handler that is not shipped in the .mar, one package per concern.

``train`` makes the model (data, architecture, training, export), ``deploy`` packages
and serves it (archive, ``make serve``, rollout, the TorchServe harness used by the
tests and the benchmark), ``ops`` operates a running server (TorchServe API client,
``ctl``, workers, drift), ``evaluate`` measures accuracy and TTA policies, and
``bench`` measures throughput and latency. ``scripts.ctl`` and ``scripts.client`` are
kept as short entry points for ``scripts.ops.ctl`` and ``scripts.ops.client``.
"""
