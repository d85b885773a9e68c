"""Bring your own classifier: from a TorchScript model and a labelled folder of images to an archive that
is served with the same guarantees as fashion_cnn (``make archive MODEL=path.pt DATA=dir/ NAME=mynet``).

``archive`` runs the doctor, proposes the spec when none is given (``propose``), calibrates, fits an
out-of-distribution detector for that model (``features``: its embedding; ``outliers``: synthetic outliers
made from the user's images), stores golden inputs, writes a report (``report``) and packages the .mar.
``digits`` is the worked example: a CNN trained here on scikit-learn's handwritten digits.
"""
