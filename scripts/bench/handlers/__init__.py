"""Baseline TorchServe handlers, packaged into benchmark .mar files only and never served
in production: a tutorial-style per-image handler (``naive_handler``) and one that does
no work (``noop_handler``), TorchServe's own ceiling.
"""
