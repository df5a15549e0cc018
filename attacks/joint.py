"""Joint detector-evasion PGD: fool the classifier *and* stay under every detector's threshold.

Carlini & Wagner, "Adversarial Examples Are Not Easily Detected: Bypassing Ten Detection
Methods", AISec 2017 (and "MagNet and 'Efficient Defenses...' Are Not Robust", 2017): a detector
is only evaluated honestly by an attacker who knows it, minimizing one loss that combines the
misclassification objective with a penalty for every detector score above its threshold.

For ``x'`` in the l-inf ball of radius eps around ``x`` (projected sign-gradient steps, Madry et
al. 2018) minimize

    L(x') = max(z_y - max_{j != y} z_j, -kappa)                      (C&W margin on the logits)
          + c * sum_d max(0, (s_d(x') - tau_d) / scale_d + margin)  (one hinge per detector d)

``z`` are the pipeline twin's logits (purifiers via their gradient or BPDA surrogate), ``s_d``
the detector's score of the raw input and ``tau_d`` its calibrated threshold; ``scale_d =
max(|tau_d|, 1e-3)`` puts the scores on comparable footing. With randomized stages the gradient
is averaged over ``eot`` draws (EOT, Athalye et al. 2018). Per item the iterate that succeeds --
misclassified on the twin's forward value and under every rejecting detector's threshold -- is
kept; restarts run again from a fresh random start on the items not yet broken.

Known limits: a detector whose score has no gradient (a scikit-learn SVM, a quantization step)
contributes no descent direction here -- its hinge is still evaluated for the success check, and
the runner records the detectors attacked without gradient. The weight ``c`` is fixed, not
binary-searched as in C&W's original.
"""

from __future__ import annotations

import torch

from robustgate.attacks.differentiable import PipelineTwin


def margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """``[N, K]``, ``[N]`` -> ``[N]``: ``z_y - max_{j != y} z_j`` clipped below at ``-kappa``."""
    true = logits.gather(1, y[:, None]).squeeze(1)  # [N]
    other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (true - other).clamp_min(-kappa)


def detector_penalty(scores: dict[str, torch.Tensor], thresholds: dict[str, float], margin: float) -> torch.Tensor:
    """Sum over detectors of ``max(0, (s - tau)/scale + margin)``; ``{name: [N]}`` -> ``[N]``."""
    total = None
    for name, s in scores.items():
        if name not in thresholds:
            continue
        tau = thresholds[name]
        hinge = ((s - tau) / max(abs(tau), 1e-3) + margin).clamp_min(0.0)
        total = hinge if total is None else total + hinge
    return total if total is not None else torch.zeros(())


class JointPGD:
    """Args: eps (l-inf radius), steps, alpha (step size; default 2.5*eps/steps), restarts,
    eot (gradient samples per step), c (detector penalty weight), margin (how far under a
    threshold to push, in units of the threshold's scale), kappa (C&W confidence)."""

    def __init__(self, twin: PipelineTwin, eps: float, steps: int = 40, alpha: float | None = None,
                 restarts: int = 1, eot: int = 1, c: float = 1.0, margin: float = 0.05, kappa: float = 0.0):
        if eps < 0 or steps < 1 or restarts < 1 or eot < 1:
            raise ValueError(f"JointPGD: need eps >= 0, steps/restarts/eot >= 1; got {eps}, {steps}, {restarts}, {eot}")
        if c < 0 or margin < 0:
            raise ValueError(f"JointPGD: c and margin must be >= 0; got c={c}, margin={margin}")
        self.twin, self.eps, self.steps, self.restarts, self.eot = twin, eps, steps, restarts, eot
        self.alpha = 2.5 * eps / steps if alpha is None else alpha
        self.c, self.margin, self.kappa = c, margin, kappa
        self.rejecting = {s.name for s in twin.detectors if s.action == "reject"}

    def _loss_and_success(self, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One draw: ``[N]`` loss (with graph) and ``[N]`` bool success on this draw's forward value."""
        logits = self.twin(x_adv)  # [N, K]
        scores = self.twin.detector_scores(x_adv)  # {name: [N]}
        thresholds = self.twin.thresholds()
        loss = margin_loss(logits, y, self.kappa) + self.c * detector_penalty(scores, thresholds, self.margin)
        ok = logits.argmax(1) != y
        for name in self.rejecting & thresholds.keys():
            ok &= scores[name].detach() <= thresholds[name]
        return loss, ok.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, C, H, W]`` in [0, 1], ``y`` ``[N]`` -> adversarial ``[N, C, H, W]``."""
        x = x.detach()
        best = x.clone()
        found = torch.zeros(len(x), dtype=torch.bool)
        for _ in range(self.restarts):
            todo = ~found
            if not todo.any():
                break
            xs, ys = x[todo], y[todo]
            # 1. random start in the ball
            x_adv = (xs + torch.empty_like(xs).uniform_(-self.eps, self.eps)).clamp(0, 1)
            sub_best, sub_found = xs.clone(), torch.zeros(len(xs), dtype=torch.bool)
            for _ in range(self.steps):
                # 2. EOT gradient of the joint loss (mean over draws)
                x_adv.requires_grad_(True)
                grad = torch.zeros_like(xs)
                ok_all = torch.ones(len(xs), dtype=torch.bool)
                for _draw in range(self.eot):
                    loss, ok = self._loss_and_success(x_adv, ys)
                    if loss.requires_grad:
                        grad += torch.autograd.grad(loss.sum(), x_adv)[0]
                    ok_all &= ok  # with EOT: success on every draw
                x_adv = x_adv.detach()
                # 3. keep the first iterate that succeeds
                newly = ok_all & ~sub_found
                sub_best[newly] = x_adv[newly]
                sub_found |= ok_all
                # 4. signed descent step, projection onto the ball and the box
                x_adv = x_adv - self.alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, xs - self.eps), xs + self.eps).clamp(0, 1)
            with torch.no_grad():
                _, ok = self._loss_and_success(x_adv, ys)
            newly = ok & ~sub_found
            sub_best[newly] = x_adv[newly]
            sub_found |= ok
            # unbroken items keep the last iterate (still a valid point in the ball)
            sub_best[~sub_found] = x_adv[~sub_found]
            best[todo] = sub_best
            found[todo] = sub_found
        return best
