"""Diagnose a model before it is served: ``doctor`` (``make doctor MODEL=path.pt``) runs the checklist of
classic CNN deployment faults (training mode left on, wrong normalisation, channel order or polarity,
input shape, collapsed predictions, probabilities instead of logits) on any TorchScript classifier and
writes a report with figures under build/doctor/.
"""
