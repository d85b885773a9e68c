"""Measure prediction quality: accuracy on the held-out split through the real HTTP
API versus in-process (``http_accuracy``), and the comparison of TTA policies that
chose the default policy and writes docs/tta.md (``tta``).
"""
