"""``advguard evaluate --quick`` end to end on the real CIFAR-10 test images and ResNet-20.

50 authentic images, short attacks, the committed demo bundle; checks the pipeline and the
numbers it must get right (about a minute and a half on 2 cores, uncached).
"""

import json

import pytest

from evaluation.options import EvaluateOptions, quick_options
from evaluation.run import evaluate
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    if not CIFAR_TAR.is_file() or not DEMO_BUNDLE.is_dir():
        pytest.fail("needs ../shared/data/cifar10-jpeg.tar.gz and the demo bundle")
    root = tmp_path_factory.mktemp("evaluate")
    options = quick_options(
        EvaluateOptions(
            source=CIFAR_TAR, out=root / "out", bundle=DEMO_BUNDLE, cache_dir=root / "cache"
        )
    )
    results = evaluate(options, log=lambda _: None)
    return root / "out", results


def test_outputs_written(quick_results):
    out, results = quick_results
    for name in (
        "table2.md",
        "results.json",
        "fig2_roc.png",
        "fig3_rates.png",
        "fig4_densities.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["bundle"] == results["bundle"]
    assert "EER accuracy" in (out / "table2.md").read_text()


def test_sets_and_attacks(quick_results):
    _, r = quick_results
    assert r["sets"]["authentic"] == 50 and r["sets"]["errors"] > 0
    attacks = r["attacks"]
    assert attacks["fgsm"]["succeeded"] >= 25
    # L-BFGS reaches the target on most images, with smaller L2 than FGSM on the same images
    assert attacks["lbfgs"]["target_rate"] >= 0.8
    cmp = r["lbfgs_vs_fgsm"]
    assert cmp["lbfgs_mean_l2"] < cmp["fgsm_mean_l2"] and cmp["lbfgs_smaller_share"] >= 0.9
    assert attacks["fgsm"]["mean_linf"] == pytest.approx(8 / 255, abs=1e-3)
    assert attacks["pgd"]["mean_linf"] <= 8 / 255 + 1e-4
    for a in attacks.values():
        assert a["succeeded"] + a["failed"] == a["attempted"]


def test_detection_numbers(quick_results):
    _, r = quick_results
    config = r["configurations"]["bundle"]
    own = config["score_function"]
    metrics = config["metrics"][own]
    # authentic images score higher than FGSM and L-BFGS adversarials on average
    assert config["authentic_mean_score"][own] > metrics["fgsm"]["mean_score"]
    assert config["authentic_mean_score"][own] > metrics["lbfgs"]["mean_score"]
    assert metrics["lbfgs"]["eer_accuracy"] > 0.6 and metrics["fgsm"]["eer_accuracy"] > 0.55
    for m in metrics.values():
        assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["tpr_at_5_fpr"] <= 1.0
    # a single vote is also scored with every weighting; a combined detector with its own
    single_vote = config["combination"] == "single" and config["statistics"][0].startswith("vote")
    assert set(config["metrics"]) == ({"knn", "wknn", "dwknn"} if single_vote else {own})
    adaptive = r["adaptive"]["adaptive"]
    assert 0.0 <= adaptive["misclassified_and_accepted"] <= adaptive["misclassified"] <= 1.0
    # The detector-aware attack runs and fools the model on some images. Against round 3's v2 it
    # also got most of them past the detector; against round 4's (the pixels' high-pass energy)
    # its signed PGD steps add the very noise that statistic sees, and it no longer does (README,
    # Detection): that is a limit of this attack, not robustness, so no bound is asserted here.
    assert adaptive["misclassified"] > 0.0
