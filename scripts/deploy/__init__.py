"""Put a model behind TorchServe: package a TorchScript file and ``handler/`` into a
.mar (``package``), start/stop/check the server from the shipped config (``serve``,
behind ``make serve``), roll out a new version beside the running one (``rollout``), and
the harness that starts a private TorchServe on free loopback ports for the
integration tests and the benchmark (``harness``).
"""
