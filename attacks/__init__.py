"""The red team: attacks the pipeline the proxy serves and reports honestly (DESIGN.md, "Honest evaluation").

- ``differentiable``: the attackable torch twin of a served pipeline (BPDA, EOT, detector scores);
- ``threat``: the threat model written beside every number, and the perturbation checks;
- ``suite``: the attacks by name (torchattacks baselines, BPDA, EOT, joint, Square);
- ``joint``, ``square``, ``endpoint``: joint detector evasion, the Square attack, the gRPC oracle;
- ``runner``, ``reports``, ``cli``: ``robustgate eval`` (served pipelines and twins from the one assembly,
  defenses/assemble.py; test data from models/data.py); ``probe``: ``robustgate probe``.
"""
