"""The v2 selection rule (``evaluation.selection``): the choice as a pure function, and the
whole ``advguard evaluate --select`` pipeline on real CIFAR-10 images with the real ResNet-20
(a small all-statistics bundle and short attacks: ~2 minutes on 2 cores, uncached)."""

import json
from dataclasses import replace

import numpy as np
import pytest

from app.core.statistics import DOUBTED_SHARE
from evaluation.options import EvaluateOptions, quick_options
from evaluation.selection import (
    FLIP_PRESET,
    JPEG_PRESET,
    MAX_BUNDLE_BYTES,
    MAX_DEFAULT_PASSES,
    MEDIAN_PRESET,
    SELECTION_ATTACKS,
    SELECTION_STATISTICS,
    STORED_SELECTION_ATTACKS,
    CandidateScore,
    choose,
    opt_in_presets,
    select,
    selection_rows,
)
from index_builder.detectors import (
    CHROMA_STATISTIC,
    DOUBT_STATISTIC,
    FLIP_STATISTIC,
    JPEG_STATISTIC,
    MEDIAN_STATISTIC,
    SUSPECT_JPEG_STATISTIC,
    candidate_presets,
    forward_passes,
)
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE


def _score(
    name: str, accepted: float, statistics: int, size: int = 1 << 20, passes: float = 1.0
) -> CandidateScore:
    return CandidateScore(
        name,
        statistics,
        size,
        {a: 0.9 for a in SELECTION_ATTACKS},
        {a: accepted for a in SELECTION_ATTACKS},
        0.98,
        passes,
    )


def test_choose_takes_the_lowest_mean_share_accepted_among_bundles_that_fit():
    scored = [
        _score("big", 0.01, 2, size=MAX_BUNDLE_BYTES + 1),
        _score("worse", 0.30, 2),
        _score("best", 0.10, 11),
        _score("middle", 0.20, 3),
    ]
    assert choose(scored).candidate == "best"


def test_the_default_never_mirrors_every_query():
    """Round 6's step 2 (kept by round 8): a detector that needs the mirrored pass for every
    query is never the default, however much less it accepts; the rule without that step names
    it (the ``v2-flip`` preset)."""
    scored = [_score("flip", 0.05, 5, passes=2), _score("one", 0.20, 4), _score("two", 0.3, 2)]
    assert choose(scored).candidate == "one"
    assert choose(scored, one_pass=False).candidate == "flip"
    assert choose([_score("one", 0.05, 4), *scored[:1]], one_pass=False).candidate == "one"


def test_the_default_may_read_the_mirror_for_the_doubted_fifth():
    """Round 8's step 2: a detector that mirrors the doubted fifth of authentic queries (1.2
    passes) may be the default; one that mirrors every query may not."""
    scored = [_score("flip", 0.05, 5, passes=2), _score("doubt", 0.1, 5, passes=1.2)]
    scored.append(_score("one", 0.2, 4))
    assert choose(scored).candidate == "doubt"
    assert choose(scored, one_pass=False).candidate == "flip"
    presets = candidate_presets()
    v2 = presets["maha-stages+margin+hp-hmp"].statistics
    doubt = presets["maha-stages+margin+hp+cn+dflip-hmp"].statistics
    assert doubt == (*v2, CHROMA_STATISTIC, DOUBT_STATISTIC)
    assert forward_passes(doubt) == 1.2
    assert forward_passes(presets["margin+dflip-fisher"].statistics) == 1.2
    assert forward_passes((*doubt, FLIP_STATISTIC)) == 2
    names = list(presets)  # listed after round 6's: an exact tie keeps the earlier rounds'
    assert all("dflip" in n for n in names[4 * 33 * 3 : 6 * 33 * 3])
    assert not any("dflip" in n for n in names[: 4 * 33 * 3])


def test_round_six_candidates_add_the_colour_noise_the_flip_margin_and_both():
    presets = candidate_presets()
    assert len(presets) == 12 * 33 * 3  # round 5's 33 statistic sets, alone and with each addition
    v2 = presets["maha-stages+margin+hp-hmp"].statistics
    assert presets["maha-stages+margin+hp+cn-hmp"].statistics == (*v2, CHROMA_STATISTIC)
    assert presets["maha-stages+margin+hp+flip-hmp"].statistics == (*v2, FLIP_STATISTIC)
    both = presets["maha-stages+margin+hp+cn+flip-hmp"].statistics
    assert both == (*v2, CHROMA_STATISTIC, FLIP_STATISTIC)
    assert forward_passes(presets["margin+cn-fisher"].statistics) == 1
    assert forward_passes(both) == 2
    names = list(presets)  # round 5's first: an exact tie keeps them
    assert not any("+cn" in n or "flip" in n for n in names[: 33 * 3])
    assert all("+cn" in n or "flip" in n for n in names[33 * 3 : 6 * 33 * 3])


def test_round_ten_candidates_add_the_median_margin_and_it_with_the_colour_noise():
    """Round 10: each of round 5's sets with the median margin (a second pass for every image,
    so never the default), and with the colour noise too, listed after round 8's."""
    presets = candidate_presets()
    names = list(presets)
    assert all("med" in n for n in names[6 * 33 * 3 : 8 * 33 * 3])
    assert not any("med" in n for n in names[: 6 * 33 * 3] + names[8 * 33 * 3 :])
    v2 = presets["knn-last+margin+hp-hmp"].statistics
    assert presets["knn-last+margin+hp+med-hmp"].statistics == (*v2, MEDIAN_STATISTIC)
    both = presets["knn-last+margin+hp+cn+med-fisher"].statistics
    assert both == (*v2, CHROMA_STATISTIC, MEDIAN_STATISTIC)
    assert forward_passes(both) == 2
    assert forward_passes((*both, DOUBT_STATISTIC)) == 2.2
    assert forward_passes((*both, FLIP_STATISTIC)) == 3
    assert forward_passes((*v2, "doubt_margin@median.logits")) == 2  # no gate on the median pass
    scored = [_score("knn-last+margin+hp+med-hmp", 0.05, 4, passes=2), _score("one", 0.2, 4)]
    assert choose(scored).candidate == "one"
    assert choose(scored, one_pass=False).candidate == "knn-last+margin+hp+med-hmp"


def test_round_twelve_candidates_add_the_jpeg_margin_and_it_with_the_colour_noise():
    """Round 12: each of round 5's sets with the JPEG margin (a second pass for every image, so
    never the default), and with the colour noise too, listed after round 10's: an exact tie
    keeps the earlier rounds' candidates."""
    presets = candidate_presets()
    names = list(presets)
    assert len(names) == 12 * 33 * 3
    assert all("+jq" in n for n in names[8 * 33 * 3 : 10 * 33 * 3])
    assert not any("jq" in n for n in names[: 8 * 33 * 3])
    base = presets["maha-stages+margin+hp-hmp"].statistics
    assert presets["maha-stages+margin+hp+jq-hmp"].statistics == (*base, JPEG_STATISTIC)
    both = presets["maha-stages+margin+hp+cn+jq-min_p"].statistics
    assert both == (*base, CHROMA_STATISTIC, JPEG_STATISTIC)
    assert forward_passes(both) == 2
    assert forward_passes((*both, DOUBT_STATISTIC)) == 2.2
    assert forward_passes((*both, MEDIAN_STATISTIC)) == 3
    scored = [_score("maha-stages+margin+hp+jq-hmp", 0.01, 5, passes=2), _score("one", 0.2, 4)]
    assert choose(scored).candidate == "one"
    assert choose(scored, one_pass=False).candidate == "maha-stages+margin+hp+jq-hmp"


def test_the_best_at_any_cost_names_the_opt_in_preset_it_becomes():
    """Rounds 6-12: the JPEG margin makes it ``v2-jpeg``, the median margin ``v2-median`` (the
    others then keep the earlier rounds' choices), the flip margin alone ``v2-flip``, a 1.2-pass
    winner none."""
    cases = {
        ("maha-stages+margin+hp+cn+jq-hmp", 2): {JPEG_PRESET: "maha-stages+margin+hp+cn+jq-hmp"},
        ("maha-stages+margin+hp+cn+med-hmp", 2): {
            MEDIAN_PRESET: "maha-stages+margin+hp+cn+med-hmp"
        },
        ("maha-stages+margin+hp+cn+flip-hmp", 2): {
            FLIP_PRESET: "maha-stages+margin+hp+cn+flip-hmp"
        },
        ("knn-last+margin+hp+cn+dflip-hmp", 1.2): {},
    }
    for (candidate, passes), named in cases.items():
        got = opt_in_presets(_score(candidate, 0.1, 6, passes=passes))
        assert got == {FLIP_PRESET: None, MEDIAN_PRESET: None, JPEG_PRESET: None, **named}


def test_choose_breaks_ties_by_fewer_statistics_then_order():
    scored = [_score("many", 0.1, 11), _score("few", 0.1, 3), _score("few-again", 0.1, 3)]
    assert choose(scored).candidate == "few"


def test_mean_accepted_averages_the_attacks_unweighted():
    shares = {a: float(i) / 10 for i, a in enumerate(SELECTION_ATTACKS)}
    score = CandidateScore("x", 2, 1, dict.fromkeys(SELECTION_ATTACKS, 0.9), shares, 0.98)
    assert score.mean_accepted == pytest.approx(sum(shares.values()) / len(shares))
    row = score.row()
    assert row["fits"] and row["mean_accepted"] == score.mean_accepted
    assert row["attacks_at_min_eer"] == 0  # EER 0.9 < 0.93 on every attack


def test_choose_refuses_when_no_bundle_fits():
    with pytest.raises(ValueError, match="no candidate"):
        choose([_score("big", 0.1, 2, size=MAX_BUNDLE_BYTES + 1)])


def test_selection_rows_avoid_the_reported_images_and_take_correct_ones():
    labels = np.repeat(np.arange(3), 120)
    predictions = labels.copy()
    predictions[::7] = (predictions[::7] + 1) % 3  # some errors
    excluded = np.arange(0, 360, 3)
    rows = selection_rows(labels, predictions, excluded, seed=0)
    assert not set(rows.tolist()) & set(excluded.tolist())
    assert (predictions[rows] == labels[rows]).all()
    assert np.bincount(labels[rows]).tolist() == [50, 50, 50]


@pytest.mark.slow
def test_select_end_to_end(tmp_path):
    if not CIFAR_TAR.is_file() or not DEMO_BUNDLE.is_dir():
        pytest.fail("needs ../shared/data/cifar10-jpeg.tar.gz and the demo bundle")
    options = replace(
        quick_options(
            EvaluateOptions(
                source=CIFAR_TAR,
                out=tmp_path / "out",
                bundle=DEMO_BUNDLE,
                cache_dir=tmp_path / "cache",
                build_per_class_limit=120,
            )
        ),
        split_per_class_limit=20,  # ~110 selection images: DeepFool is the slow attack
    )
    messages: list[str] = []
    result = select(options, log=messages.append)
    written = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert "lowest mean share" in written["rule"]
    assert "Chosen" in (tmp_path / "out" / "selection.md").read_text()
    rows = written["candidates"]
    assert [r["candidate"] for r in rows] == list(candidate_presets())
    for r in rows:
        for attack in SELECTION_ATTACKS:
            assert 0.0 <= r["accepted"][attack] <= 1.0
            assert 0.0 <= r["eer"][attack] <= 1.0
    # the choice re-derived from the written rows
    fitting = [r for r in rows if r["fits"]]
    best = min(fitting, key=lambda r: (r["mean_accepted"], r["statistics"]))
    one_pass = [r for r in fitting if r["forward_passes"] <= 1.2]
    assert (
        written["chosen"]
        == min(one_pass, key=lambda r: (r["mean_accepted"], r["statistics"]))["candidate"]
    )
    assert written["chosen_at_any_cost"] == best["candidate"]
    statistics = candidate_presets()[best["candidate"]].statistics
    jpeg = JPEG_STATISTIC in statistics
    median = MEDIAN_STATISTIC in statistics and not jpeg
    flip = best["candidate"] if best["forward_passes"] == 2 and not (median or jpeg) else None
    assert written["v2-flip"] == flip
    assert written["v2-median"] == (best["candidate"] if median else None)
    assert written["v2-jpeg"] == (best["candidate"] if jpeg else None)
    assert {r["forward_passes"] for r in rows} == {1, 1.2, 2}
    # every selection attack ran and fooled the model on most images (DeepFool: nearly all)
    fooled = {m.split(":")[0]: m for m in messages if m.startswith("selection ")}
    assert set(fooled) == {f"selection {a}" for a in SELECTION_ATTACKS}
    deepfool, total = fooled["selection deepfool"].split(": ")[1].split()[0].split("/")
    assert int(deepfool) >= 0.9 * int(total) and written["selection_images"] == int(total)
    # round 11's stored sets: a JPEG of each source's successful adversarials, some still fooling
    for stored_attack, source in STORED_SELECTION_ATTACKS.items():
        kept, crafted = fooled[f"selection {stored_attack}"].split(": ")[1].split()[0].split("/")
        assert int(crafted) == int(fooled[f"selection {source}"].split(": ")[1].split("/")[0])
        assert 0 < int(kept) <= int(crafted)
    # the finding holds even at this size: density at every block sees untargeted PGD,
    # which the vote and the margin wave through
    eer = {r["candidate"]: r["eer"]["pgd_untargeted"] for r in rows}
    assert eer["maha-blocks-hmp"] >= 0.8 > 0.5 > eer["margin-hmp"]


def test_round_thirteen_candidates_add_the_suspect_jpeg_margin_at_a_fifth_of_a_pass():
    """Round 13: each of round 5's sets with the suspect JPEG margin (a second pass for the
    fifth of queries the other statistics doubt, so a candidate for the default), and with the
    colour noise too, listed last."""
    presets = candidate_presets()
    names = list(presets)
    assert all("+sjq" in n for n in names[10 * 33 * 3 :])
    assert not any("sjq" in n for n in names[: 10 * 33 * 3])
    base = presets["maha-stages+margin+hp-hmp"].statistics
    assert presets["maha-stages+margin+hp+sjq-hmp"].statistics == (*base, SUSPECT_JPEG_STATISTIC)
    both = presets["maha-stages+margin+hp+cn+sjq-fisher"].statistics
    assert both == (*base, CHROMA_STATISTIC, SUSPECT_JPEG_STATISTIC)
    assert forward_passes(both) == 1.0 + DOUBTED_SHARE <= MAX_DEFAULT_PASSES
    assert forward_passes((*both, JPEG_STATISTIC)) == 2  # read by the plain margin: every query
    assert forward_passes((*both, DOUBT_STATISTIC)) == 1.0 + 2 * DOUBTED_SHARE
    assert SUSPECT_JPEG_STATISTIC in SELECTION_STATISTICS
