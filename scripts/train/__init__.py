"""Make the served model: load the data (the shared subset, IDX files or class folders)
and split it, define the Fashion CNN, train it, and export it as a checked TorchScript
file with its spec and reference distributions inside (``models/fashion_cnn.pt``).
``build_resnet`` builds a scripted ResNet-18 with its own spec, which the tests and the
benchmark use to show the unchanged handler serves other classifiers.
"""
