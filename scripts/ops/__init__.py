"""Operate a running TorchServe through its own APIs: the token-aware API client
(``tsclient``), the ``ctl`` command (status, scale, versions, set-default, predict,
health, metrics, drift), the ``client`` and ``workers`` entry points built on it, and
the drift report that compares live Prometheus distributions with the training reference.
"""
