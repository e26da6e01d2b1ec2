"""The builder's command line: every option reaches the build's configuration, unswapped."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from index_builder.cli import add_build_arguments, config_of
from index_builder.config import BuildConfig

ARGV = [
    "--source", "src.tar.gz", "--split", "train", "--arch", "resnet56", "--weights", "w.th",
    "--out", "bundle", "--layer", "layer2.2", "--layer", "layer3.2", "--processing", "l2",
    "--pca-dims", "48", "--index", "ivf", "--nlist", "17", "--nprobe", "5", "--k", "33",
    "--score", "wknn", "--detector", "paper", "--statistic", "vote@layer3.2",
    "--statistic", "mahalanobis@blocks", "--combination", "fisher", "--class-k", "7",
    "--holdout-fraction", "0.2", "--calibration-source", "val", "--calibration-split", "val2",
    "--per-class-limit", "11", "--retention", "0.95", "--batch-size", "64", "--workers", "3",
    "--chunk-size", "99", "--work-dir", "wd", "--keep-work-dir", "--device", "cpu", "--seed",
    "5", "--name", "custom", "--license-file", "LICENSE.txt",
]  # fmt: skip


def test_every_option_reaches_the_config_unswapped() -> None:
    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    expected = BuildConfig(
        source=Path("src.tar.gz"),
        split="train",
        arch="resnet56",
        weights=Path("w.th"),
        out=Path("bundle"),
        layers=("layer2.2", "layer3.2"),
        processing="l2",
        pca_dims=48,
        index_type="ivf",
        nlist=17,
        nprobe=5,
        k=33,
        score_function="wknn",
        detector="paper",
        statistics=("vote@layer3.2", "mahalanobis@blocks"),
        combination="fisher",
        class_k=7,
        holdout_fraction=0.2,
        calibration_source=Path("val"),
        calibration_split="val2",
        per_class_limit=11,
        retention=0.95,
        batch_size=64,
        num_workers=3,
        chunk_size=99,
        work_dir=Path("wd"),
        keep_work_dir=True,
        device="cpu",
        seed=5,
        name="custom",
        license_file=Path("LICENSE.txt"),
    )
    # every field differs from its default, so an option dropped on the way would show
    for field in dataclasses.fields(BuildConfig):
        if field.default is not dataclasses.MISSING:
            assert getattr(expected, field.name) != field.default, field.name
    assert config_of(parser.parse_args(ARGV)) == expected
