"""Verdict semantics of the pipeline runner (DESIGN.md, "The defense pipeline").

The defenses here are small test-local classes (not registered): they make the runner's rules
observable -- which input a detector sees, the order of purifiers, one classify call per
batch, failure policies -- independently of any real defense.
"""

import pytest
import torch

from robustgate.defenses.base import Detector, Ensemble, EnsembleResult, Purifier
from robustgate.defenses.pipeline import ACCEPTED, FLAGGED, REJECTED, DefendedModel, Stage


class MeanDetector(Detector):
    """Score = mean pixel value of each item; records what it saw."""

    kind = "test_mean"

    def __init__(self, threshold=None):
        super().__init__(threshold)
        self.seen = []

    def score(self, x, classifier=None):
        self.seen.append(x.clone())
        return x.mean(dim=(1, 2, 3))


class BrokenDetector(Detector):
    kind = "test_broken"

    def score(self, x, classifier=None):
        raise RuntimeError("boom")


class AddPurifier(Purifier):
    kind = "test_add"

    def __init__(self, delta):
        self.delta = delta

    def purify(self, x, generator=None):
        return (x + self.delta).clamp(0, 1)


class FlipEnsemble(Ensemble):
    """T = 2 copies: identity and horizontal flip; abstains where the copies disagree."""

    kind = "test_flip"

    @property
    def copies(self):
        return 2

    def expand(self, x, generator=None):
        return torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)  # [N*2, C, H, W], item-major

    def aggregate(self, logits):
        probs = logits.softmax(-1).view(-1, 2, logits.shape[-1])  # [N, T, K]
        top = probs.argmax(-1)  # [N, T]
        return EnsembleResult(probs=probs.mean(1), abstain=top[:, 0] != top[:, 1])


class CountingClassifier:
    """Logits [-s, s] with s = sum of the right half minus the left half of the image."""

    def __init__(self):
        self.calls = []

    def __call__(self, x):
        self.calls.append(x.shape[0])
        w = x.shape[-1]
        s = x[..., w // 2:].sum(dim=(1, 2, 3)) - x[..., : w // 2].sum(dim=(1, 2, 3))
        return torch.stack([-s, s], dim=1)


def batch():
    x = torch.zeros(3, 1, 4, 4)
    x[0] = 0.1  # low mean
    x[1] = 0.9  # high mean
    x[2, ..., 2:] = 1.0  # mean 0.5, right-heavy
    return x


def test_no_stages_returns_the_classifier_logits_all_accepted():
    clf = CountingClassifier()
    out = DefendedModel([], clf)(batch())
    assert out.verdict.tolist() == [ACCEPTED] * 3
    assert out.reason == [None] * 3
    assert torch.equal(out.logits, CountingClassifier()(batch()))
    assert clf.calls == [3] and "classify" in out.seconds


@pytest.mark.parametrize(
    "action, expected",
    [("reject", [ACCEPTED, REJECTED, ACCEPTED]), ("flag", [ACCEPTED, FLAGGED, ACCEPTED]), ("log", [ACCEPTED] * 3)],
)
def test_detector_actions(action, expected):
    det = MeanDetector(threshold=0.6)
    out = DefendedModel([Stage("mean", det, action)], CountingClassifier())(batch())
    assert out.verdict.tolist() == expected
    assert out.reason[1] == (None if action == "log" else "mean")
    assert torch.allclose(out.scores["mean"], torch.tensor([0.1, 0.9, 0.5]))
    assert out.thresholds == {"mean": 0.6}


def test_detectors_score_the_raw_input_even_after_a_purifier():
    det = MeanDetector(threshold=0.6)
    stages = [Stage("shift", AddPurifier(0.5)), Stage("mean", det)]
    x = batch()
    out = DefendedModel(stages, CountingClassifier())(x)
    assert torch.equal(det.seen[0], x)  # raw, not shifted
    assert out.verdict.tolist() == [ACCEPTED, REJECTED, ACCEPTED]


def test_purifiers_apply_in_order_before_classify():
    clf = CountingClassifier()
    stages = [Stage("a", AddPurifier(0.5)), Stage("b", AddPurifier(-0.25))]
    x = batch()
    out = DefendedModel(stages, clf)(x)
    expected = CountingClassifier()((x + 0.5).clamp(0, 1) - 0.25)
    assert torch.allclose(out.logits, expected)


def test_reject_wins_over_flag_and_first_rejecting_stage_is_the_reason():
    stages = [
        Stage("flagger", MeanDetector(threshold=0.05), "flag"),
        Stage("rejecter", MeanDetector(threshold=0.6), "reject"),
    ]
    out = DefendedModel(stages, CountingClassifier())(batch())
    assert out.verdict.tolist() == [FLAGGED, REJECTED, FLAGGED]
    assert out.reason == ["flagger", "rejecter", "flagger"]


def test_ensemble_fans_out_in_one_classify_call_and_abstention_rejects():
    clf = CountingClassifier()
    out = DefendedModel([Stage("flip", FlipEnsemble())], clf)(batch())
    assert clf.calls == [6]  # one backend call of N*T items
    # item 2 is right-heavy: the flipped copy is left-heavy, so the copies disagree -> abstain
    assert out.verdict.tolist() == [ACCEPTED, ACCEPTED, REJECTED]
    assert out.reason[2] == "flip"
    assert torch.allclose(out.logits.exp().sum(-1), torch.ones(3))


@pytest.mark.parametrize("limit, calls", [(6, [6]), (100, [6]), (4, [4, 2]), (1, [1] * 6)])
def test_a_large_fan_out_is_classified_in_chunks_with_the_same_answer(limit, calls):
    whole = DefendedModel([Stage("flip", FlipEnsemble())], CountingClassifier())(batch())
    clf = CountingClassifier()
    out = DefendedModel([Stage("flip", FlipEnsemble())], clf, max_fanout_items=limit)(batch())
    assert clf.calls == calls  # consecutive backend calls of at most `limit` copies
    assert torch.equal(out.logits, whole.logits) and out.verdict.tolist() == whole.verdict.tolist()
    with pytest.raises(ValueError, match="max_fanout_items"):
        DefendedModel([], clf, max_fanout_items=0)


def test_fail_closed_rejects_every_item_and_fail_open_skips_the_stage():
    stages = [Stage("broken", BrokenDetector(threshold=0.0))]
    closed = DefendedModel(stages, CountingClassifier(), failure_policy="fail-closed")(batch())
    assert closed.verdict.tolist() == [REJECTED] * 3
    assert closed.reason == ["broken failed"] * 3 and closed.failed_stages == ["broken"]
    opened = DefendedModel(stages, CountingClassifier(), failure_policy="fail-open")(batch())
    assert opened.verdict.tolist() == [ACCEPTED] * 3 and opened.failed_stages == ["broken"]


def test_classifier_failure_is_not_absorbed():
    def broken(x):
        raise RuntimeError("backend down")

    with pytest.raises(RuntimeError, match="backend down"):
        DefendedModel([], broken)(batch())


@pytest.mark.parametrize(
    "stages, message",
    [
        ([Stage("a", AddPurifier(0.1)), Stage("a", AddPurifier(0.2))], "unique; repeated: a"),
        ([Stage("flip", FlipEnsemble()), Stage("p", AddPurifier(0.1))], "must be the last stage"),
        ([Stage("m", MeanDetector())], "no calibrated threshold"),
    ],
)
def test_invalid_stage_lists_are_refused(stages, message):
    with pytest.raises(ValueError, match=message):
        DefendedModel(stages, CountingClassifier())


def test_unknown_failure_policy_is_refused():
    with pytest.raises(ValueError, match="failure_policy"):
        DefendedModel([], CountingClassifier(), failure_policy="retry")


class FeatureDetector(Detector):
    """Score = sum of the classifier's features on x plus its logit 1 on x (a SafetyNet-like query)."""

    kind = "test_features"

    def score(self, x, classifier=None):
        return classifier.features(x).sum(1) + classifier.logits(x)[:, 1]


class LocalBackbone:
    """The local classifier view: features = per-item mean; counts its calls."""

    def __init__(self):
        self.model, self.calls = CountingClassifier(), []

    def logits(self, x):
        self.calls.append("logits")
        return self.model(x)

    def features(self, x):
        self.calls.append("features")
        return x.mean(dim=(2, 3))  # [N, C]


def test_shared_pass_serves_detectors_from_the_classify_pass():
    x = batch()
    plain_local, shared_local = LocalBackbone(), LocalBackbone()
    stages = [Stage("feat", FeatureDetector(threshold=1.0))]
    plain = DefendedModel(stages, CountingClassifier(), plain_local)(x)
    classify, passes = CountingClassifier(), []

    def classify_features(h):  # one pass: logits and features
        passes.append(h)
        return LocalBackbone().model(h), h.mean(dim=(2, 3))

    shared = DefendedModel(stages, classify, shared_local, classify_features=classify_features)(x)
    assert len(passes) == 1 and passes[0] is x and classify.calls == []  # classify ran once, in the shared pass
    assert shared_local.calls == [] and plain_local.calls == ["features", "logits"]  # no second backbone run
    assert torch.equal(shared.scores["feat"], plain.scores["feat"]) and torch.equal(shared.logits, plain.logits)
    assert shared.verdict.tolist() == plain.verdict.tolist() == [ACCEPTED, ACCEPTED, REJECTED]


def test_shared_pass_not_used_when_the_classifier_sees_purified_input():
    local, passes = LocalBackbone(), []
    stages = [Stage("feat", FeatureDetector(threshold=1.0)), Stage("shift", AddPurifier(0.25))]
    out = DefendedModel(stages, CountingClassifier(), local,
                        classify_features=lambda h: passes.append(h) or (None, None))(batch())
    assert passes == [] and local.calls == ["features", "logits"]  # detectors queried the local backbone
    assert out.logits.shape == (3, 2)


def test_shared_pass_without_features_falls_back_to_the_local_classifier():
    local = LocalBackbone()
    out = DefendedModel([Stage("feat", FeatureDetector(threshold=1.0))], CountingClassifier(), local,
                        classify_features=lambda h: (CountingClassifier()(h), None))(batch())
    assert local.calls == ["features"]  # logits on x came from the pass, features from the local copy
    assert out.verdict.tolist() == [ACCEPTED, ACCEPTED, REJECTED]


def test_fused_scores_from_the_shared_pass_replace_the_detector_call():
    x = batch()
    plain = DefendedModel([Stage("mean", MeanDetector(threshold=0.5))], CountingClassifier())(x)
    # the fused score is the same function of x; the detector itself would fail if called
    stages = [Stage("mean", BrokenDetector(threshold=0.5)), Stage("feat", FeatureDetector(threshold=1.0), "log")]
    fused = DefendedModel(stages, CountingClassifier(), LocalBackbone(), failure_policy="fail-closed",
                          classify_features=lambda h: (LocalBackbone().model(h), h.mean(dim=(2, 3)),
                                                       {"mean": MeanDetector().score(h)}))(x)
    assert fused.failed_stages == [] and "mean" not in fused.seconds and "feat" in fused.seconds
    assert torch.equal(fused.scores["mean"], plain.scores["mean"])
    assert fused.verdict.tolist() == plain.verdict.tolist() and fused.reason == plain.reason
