"""The evaluation's configurations (evaluation.configurations): the ablations of the all-statistics
bundle, each statistic family alone and with the vote, the margin and the pixels' high-pass
statistics added where they belong."""

from evaluation.configurations import ablation_columns


def test_ablations_add_the_margin_to_every_family_with_the_vote():
    names = [
        "vote@layer3.2",
        "mahalanobis@layer1.2",
        "mahalanobis@layer3.2",
        "knn_distance50@layer3.2",
        "margin@linear",
    ]
    rows = {label: (columns, how) for label, columns, how in ablation_columns(names)}
    assert rows["margin"] == ([4], None)
    assert rows["vote+margin [hmp]"] == ([0, 4], "hmp")
    assert rows["vote+mahalanobis@stages+margin [fisher]"] == ([0, 1, 2, 4], "fisher")
    assert rows["vote+mahalanobis@stages [fisher]"] == ([0, 1, 2], "fisher")
    assert "mahalanobis@blocks+margin [hmp]" not in rows  # families without the vote keep none
    assert all(4 not in columns for label, (columns, _) in rows.items() if "margin" not in label)


def test_ablations_keep_the_pixels_high_pass_apart_from_the_blocks():
    """``mahalanobis@pixels.highpass`` is not a block: it is its own family, added ("+hp") to
    every family with the vote, the margin variants included, and never inside "@blocks"."""
    names = [
        "vote@layer3.2",
        "mahalanobis@layer1.2",
        "mahalanobis@layer3.2",
        "margin@linear",
        "mahalanobis@pixels.highpass",
    ]
    rows = {label: (columns, how) for label, columns, how in ablation_columns(names)}
    assert rows["mahalanobis@blocks [hmp]"] == ([1, 2], "hmp")
    assert rows["mahalanobis@pixels.highpass"] == ([4], None)
    assert rows["vote+mahalanobis@stages+margin+hp [hmp]"] == ([0, 1, 2, 3, 4], "hmp")
    assert rows["vote+hp [min_p]"] == ([0, 4], "min_p")
    assert all(
        4 not in columns
        for label, (columns, _) in rows.items()
        if "hp" not in label and "pixels" not in label
    )


def test_ablations_add_the_log_high_pass_beside_the_raw_one_never_with_it():
    """``+lhp`` (round 5) mirrors ``+hp``: added to every family with the vote, margin variants
    included, and never to a family that already holds the raw high-pass statistic."""
    names = [
        "vote@layer3.2",
        "mahalanobis@layer3.2",
        "margin@linear",
        "mahalanobis@pixels.highpass",
        "mahalanobis@pixels.loghighpass",
    ]
    rows = {label: (columns, how) for label, columns, how in ablation_columns(names)}
    assert rows["mahalanobis@pixels.loghighpass"] == ([4], None)
    assert rows["vote+mahalanobis@stages+margin+lhp [hmp]"] == ([0, 1, 2, 4], "hmp")
    assert rows["vote+mahalanobis@stages+margin+hp [hmp]"] == ([0, 1, 2, 3], "hmp")
    assert rows["vote+lhp [fisher]"] == ([0, 4], "fisher")
    assert not any(3 in columns and 4 in columns for columns, _ in rows.values())
    assert not any("hp+lhp" in label or "lhp+hp" in label for label in rows)
