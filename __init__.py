"""robustgate: an inference-time defense proxy for image classifiers.

The repository root is this package: ``robustgate.proxy`` (the gRPC server),
``robustgate.protos`` (Open Inference Protocol v2), ``robustgate.defenses`` (detectors,
purifiers, ensembles), ``robustgate.models`` (datasets, architectures, trainers, bundles) and
``robustgate.attacks`` (the red team). See DESIGN.md in the shared folder for the data flow.
"""

__version__ = "0.1.0"
