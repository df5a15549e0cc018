"""Detectors: score the raw input, one score per item (higher = more suspicious), thresholds
calibrated by ``robustgate fit`` to a clean false-positive rate (defenses/calibration.py).

Importing this package registers every detector kind -- ``magnet`` (Meng & Chen 2017),
``safetynet`` (Lu et al. 2017) -- and MagNet's reformer purifier (kind ``reformer``).

For the red team (adaptive attacks that drive the scores under their thresholds, Carlini &
Wagner 2017): build a fitted detector with ``runtime="torch"`` (the default) and pass a
classifier that keeps the autograd graph; ``score(x, classifier)`` is then differentiable in ``x``:

- ``magnet``: exact gradients through the autoencoder (and the classifier, for ``jsd``);
- ``safetynet``: a straight-through (BPDA) gradient through the quantizer, exact through the
  torch RBF-SVM; ``SafetyNet.differentiable`` is False to say so.

The proxy runs the same artifacts with ``runtime: onnx`` in the stage params; the parity tests
(tests/defenses/test_detect_*.py) tie the two runtimes together.
"""

from robustgate.defenses.detect import magnet, safetynet  # noqa: F401
