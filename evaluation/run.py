"""``advguard evaluate``: the paper's protocol on a bundle's model, then the studies past it.

A pipeline of named stages (``evaluate``): model -> sets (Authentic, Errors) -> attacks (targeted
FGSM, L-BFGS, PGD, CW; untargeted FGSM, PGD-Linf, PGD-L2; cached) -> transfer sets (another
model's adversarials) -> configurations (bundles built by the index builder: the paper's Table 2
grid, layer study, k sweep, multi-layer Fisher; the v2 detector and its ablations) -> features
-> adaptive white-box attacks -> scores (EER accuracy, AUROC, TPR at 5% FPR, share accepted at
the threshold) -> reports (``table2.md``, ``results.json``, figures).

What a run is asked to do is ``evaluation.options``; the detector configurations, how each
becomes a Guard (a cached build or a view of one) and what it scores, ``evaluation.configurations``.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.core.errors import ModelLoadError
from app.core.features import (
    PIXEL_LAYERS,
    SECOND_PASS_LAYERS,
    BatchFeatures,
    FeatureNetwork,
    infer_in_batches,
)
from app.core.guard import Guard
from app.core.manifest import Manifest
from app.core.models import (
    PRESETS,
    ArchitectureInfo,
    describe_architecture,
    load_model,
    logits_layer,
    residual_blocks,
)
from app.core.scoring import SCORE_FUNCTIONS, ScoreFunction
from app.core.statistics import KnnVote
from evaluation import attacks, report
from evaluation.adaptive import adaptive_pgd, surrogates
from evaluation.configurations import (
    ALL_STATISTICS,
    V2_PRESETS,
    DetectorConfig,
    StatisticMemo,
    build_configuration,
    detector_configs,
    guard_scores,
    layer_views,
    paper_config,
    statistic_views,
)
from evaluation.data import ImageSplit as Split
from evaluation.data import load_split
from evaluation.metrics import set_metrics
from evaluation.options import AttackParams, EvaluateOptions, Log
from evaluation.sets import (
    TRANSFER_ATTACKS,
    Selection,
    cache_key,
    cached_attack,
    export_attack_sets,
    export_path,
    load_attack_sets,
    pixels_digest,
    select_sets,
)

# The order sets appear in tables; "aggr" pools L-BFGS and FGSM (the paper's Aggr.).
SET_ORDER: tuple[str, ...] = (
    "lbfgs",
    "fgsm",
    "aggr",
    "errors",
    "pgd",
    "cw",
    "fgsm_untargeted",
    "pgd_untargeted",
    "pgd_l2",
    "transfer_fgsm",
    "transfer_pgd",
    "transfer_fgsm_untargeted",
    "transfer_pgd_untargeted",
    "transfer_pgd_l2",
    "transfer_cw",
    "transfer_lbfgs",
    "adaptive",
    "adaptive_multilayer",
    "adaptive_v2",
    "adaptive_v2_l2",
    "adaptive_v2_flip",
    "adaptive_v2_flip_l2",
    "adaptive_v2_median",
    "adaptive_v2_median_l2",
    "adaptive_v2_jpeg",
    "adaptive_v2_jpeg_l2",
    "adaptive_own",
    "adaptive_own_l2",
)
# The columns that show each configuration the white-box attacks crafted against it: the first
# PGD-Linf one, and the smooth PGD-L2 one (sets whose names end in ``_l2``).
OWN_ADAPTIVE_COLUMNS: tuple[str, ...] = ("adaptive_own", "adaptive_own_l2")


@dataclass(frozen=True)
class ModelUnderTest:
    """Stage 1: the model, its hooked network and the bundle whose model it is."""

    arch: str
    weights: Path
    name: str
    manifest: Manifest
    base_guard: Guard
    info: ArchitectureInfo
    network: FeatureNetwork
    classifier: attacks.LogitsModel

    @property
    def stage_layers(self) -> tuple[str, ...]:
        """The stage outputs of the paper-era studies (Table 2's last layer, layer study)."""
        if self.info.family == "cifar":
            return ("layer1", "layer2", "layer3")
        return (self.info.default_layer,)


@dataclass(frozen=True)
class ImageSets:
    """Stage 2: the test split, Authentic / Authentic Errors and the attack targets."""

    split: Split
    selection: Selection
    test_accuracy: float
    x_auth: torch.Tensor
    y_auth: np.ndarray
    targets: torch.Tensor
    predictions: np.ndarray  # the model's prediction of every test image


@dataclass
class AttackSetsFound:
    """Stage 3: successful adversarials per set, with their source rows and statistics."""

    adversarial: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # rows of Authentic they came from
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    lbfgs_vs_fgsm: dict[str, Any] = field(default_factory=dict)


def model_stage(options: EvaluateOptions, log: Log) -> ModelUnderTest:
    """The model, its paper bundle and one feature network hooked at every layer a statistic
    of the evaluated configurations reads."""
    if options.bundle is not None:
        base_guard = Guard.load(options.bundle, device="cpu")
        manifest = base_guard.manifest
        arch = manifest.model.arch
        weights = options.bundle / manifest.model.weights_file
        model_name = options.name or manifest.name
    else:
        if options.arch is None or options.weights is None:
            raise ValueError("give a bundle, or an architecture and its weights")
        arch, weights = options.arch, options.weights
        model_name = options.name or f"cifar10-{arch}"
        info = describe_architecture(arch)
        base_dir = build_configuration(
            options, arch, weights, paper_config(info.default_layer), model_name, log
        )
        base_guard = Guard.load(base_dir, device="cpu")
        manifest = base_guard.manifest
    info = describe_architecture(arch)
    model = load_model(arch, weights, manifest.model.num_classes)
    stages = ("layer1", "layer2", "layer3") if info.family == "cifar" else (info.default_layer,)
    try:
        blocks = tuple(residual_blocks(model))
    except ModelLoadError:
        blocks = ()
    # every layer a statistic of any configuration may read; for the CIFAR models also the
    # second passes of `v2-flip`, `v2-median` and round 12's JPEG margin (the classifier
    # attacks read the first pass only; an adaptive attack runs the second passes its
    # surrogates read, and differentiates them)
    pseudo = [*PIXEL_LAYERS, *(SECOND_PASS_LAYERS if info.family == "cifar" else ())]
    layers = list(
        dict.fromkeys([*stages, *blocks, logits_layer(model), *pseudo, *base_guard.layers])
    )
    network = FeatureNetwork(model, layers, PRESETS[info.preset]).eval()
    return ModelUnderTest(
        arch,
        weights,
        model_name,
        manifest,
        base_guard,
        info,
        network,
        attacks.LogitsModel(network).eval(),
    )


def sets_stage(options: EvaluateOptions, mut: ModelUnderTest, log: Log) -> ImageSets:
    cache = options.cache_dir
    split = load_split(
        options.source,
        "test",
        PRESETS[mut.info.preset],
        cache / "data",
        options.split_per_class_limit,
    )
    if split.classes != list(mut.manifest.class_names):
        raise ValueError("the test split's classes differ from the bundle's")
    pred_path = cache / "data" / f"predictions-{predictions_key(mut, split)}.npy"
    if pred_path.is_file():
        predictions = np.load(pred_path)
    else:
        predictions = attacks.predict(mut.classifier, split.tensor(np.arange(len(split.keys))))
        np.save(pred_path, predictions)
    selection = select_sets(
        split.labels, predictions, len(split.classes), options.per_class, options.seed
    )
    test_accuracy = float((predictions == split.labels).mean())
    log(
        f"test accuracy {test_accuracy:.4f}; authentic {selection.authentic.size}, "
        f"errors {selection.errors.size}"
    )
    return ImageSets(
        split=split,
        selection=selection,
        test_accuracy=test_accuracy,
        x_auth=split.tensor(selection.authentic),
        y_auth=split.labels[selection.authentic],
        targets=torch.from_numpy(selection.targets),
        predictions=predictions,
    )


def attack_runners(
    p: AttackParams,
    classifier: nn.Module,
    x: torch.Tensor,
    y: np.ndarray,
    targets: torch.Tensor,
    bs: int,
    log: Log,
) -> dict[str, tuple[dict[str, object], Callable[[], attacks.AttackOutput]]]:
    """Every non-adaptive attack: the paper's targeted ones, then the untargeted ones."""
    labels = torch.from_numpy(y)
    return {
        "fgsm": (
            {"eps": p.fgsm_eps},
            lambda: attacks.fgsm_targeted(classifier, x, targets, p.fgsm_eps, bs),
        ),
        "lbfgs": (
            {"c_grid": p.lbfgs_c_grid, "binary": p.lbfgs_binary_steps, "iter": p.lbfgs_maxiter},
            lambda: attacks.lbfgs_targeted(
                classifier,
                x,
                targets,
                p.lbfgs_c_grid,
                p.lbfgs_binary_steps,
                p.lbfgs_maxiter,
                bs,
                progress=log,
            ),
        ),
        "pgd": (
            {"eps": p.pgd_eps, "alpha": p.pgd_alpha, "steps": p.pgd_steps},
            lambda: attacks.pgd_targeted(
                classifier, x, targets, p.pgd_eps, p.pgd_alpha, p.pgd_steps, bs
            ),
        ),
        "cw": (
            {"c": p.cw_c, "kappa": p.cw_kappa, "steps": p.cw_steps, "lr": p.cw_lr},
            lambda: attacks.cw_targeted(
                classifier, x, targets, p.cw_c, p.cw_kappa, p.cw_steps, p.cw_lr, bs
            ),
        ),
        "fgsm_untargeted": (
            {"eps": p.fgsm_eps},
            lambda: attacks.fgsm_untargeted(classifier, x, labels, p.fgsm_eps, bs),
        ),
        "pgd_untargeted": (
            {"eps": p.pgd_eps, "alpha": p.pgd_alpha, "steps": p.pgd_steps},
            lambda: attacks.pgd_untargeted(
                classifier, x, labels, p.pgd_eps, p.pgd_alpha, p.pgd_steps, bs
            ),
        ),
        "pgd_l2": (
            {"eps": p.pgd_l2_eps, "alpha": p.pgd_l2_alpha, "steps": p.pgd_steps},
            lambda: attacks.pgd_l2_untargeted(
                classifier, x, labels, p.pgd_l2_eps, p.pgd_l2_alpha, p.pgd_steps, bs
            ),
        ),
    }


def record_attack(
    found: AttackSetsFound,
    mut: ModelUnderTest,
    sets: ImageSets,
    name: str,
    params: dict[str, object],
    output: attacks.AttackOutput,
    hit: bool,
    log: Log,
) -> None:
    """Keep the successful (misclassified) adversarials of one attack and its statistics."""
    predicted = attacks.predict(mut.classifier, torch.from_numpy(output.adversarial))
    success = predicted != sets.y_auth
    reached = predicted == sets.selection.targets
    l2, linf = attacks.perturbation_norms(output.adversarial, sets.x_auth.numpy())
    found.adversarial[name] = output.adversarial[success]
    found.rows[name] = np.flatnonzero(success)
    found.stats[name] = {
        "params": params,
        "attempted": int(success.size),
        "succeeded": int(success.sum()),
        "failed": int((~success).sum()),
        "target_reached": int(reached.sum()),
        "target_rate": round(float(reached.mean()), 4),
        "mean_l2": round(float(l2[success].mean()), 4) if success.any() else None,
        "mean_linf": round(float(linf[success].mean()), 4) if success.any() else None,
        "seconds": round(output.seconds, 1),
        "cached": hit,
    }
    log(
        f"{name}: {int(success.sum())}/{success.size} misclassified, {int(reached.sum())} reach "
        f"the target, mean L2 {found.stats[name]['mean_l2']}, Linf "
        f"{found.stats[name]['mean_linf']} ({output.seconds:.0f} s{', cached' if hit else ''})"
    )


def predictions_key(mut: ModelUnderTest, split: Split) -> str:
    """The cached test-split predictions' key: the weights and the very pixels predicted."""
    return cache_key(
        {
            "w": mut.manifest.model.weights_sha256,
            "keys": split.keys,
            "pixels": pixels_digest(split.pixels),
        }
    )


def attack_key(mut: ModelUnderTest, sets: ImageSets, seed: int) -> dict[str, object]:
    """What every cached attack of this run shares: the weights, the attacked images and their
    targets (by content, so another source or preprocessing is attacked afresh) and the seed."""
    return {
        "weights": mut.manifest.model.weights_sha256,
        "rows": cache_key(
            {"rows": sets.selection.authentic.tolist(), "t": sets.selection.targets.tolist()}
        ),
        "pixels": pixels_digest(sets.x_auth, sets.targets),
        "seed": seed,
    }


def attack_stage(
    options: EvaluateOptions,
    mut: ModelUnderTest,
    sets: ImageSets,
    log: Log,
    timings: dict[str, float],
) -> AttackSetsFound:
    found = AttackSetsFound()
    runners = attack_runners(
        options.attack,
        mut.classifier,
        sets.x_auth,
        sets.y_auth,
        sets.targets,
        options.batch_size,
        log,
    )
    base_key = attack_key(mut, sets, options.seed)
    for name, (params, run) in runners.items():
        t0 = time.perf_counter()
        output, hit = cached_attack(
            options.cache_dir / "adversarials", {**base_key, "attack": name, **params}, run
        )
        record_attack(found, mut, sets, name, params, output, hit, log)
        timings[f"attack_{name}_seconds"] = time.perf_counter() - t0
    found.lbfgs_vs_fgsm = _lbfgs_vs_fgsm(found, sets)
    return found


def _lbfgs_vs_fgsm(found: AttackSetsFound, sets: ImageSets) -> dict[str, Any]:
    """L-BFGS against FGSM on the same images (both successful)."""
    both = np.intersect1d(found.rows["lbfgs"], found.rows["fgsm"])
    original = sets.x_auth.numpy()

    def l2(name: str) -> np.ndarray:
        positions = np.searchsorted(found.rows[name], both)
        norms, _ = attacks.perturbation_norms(found.adversarial[name][positions], original[both])
        return norms

    lbfgs, fgsm = l2("lbfgs"), l2("fgsm")
    return {
        "images": int(both.size),
        "lbfgs_mean_l2": round(float(lbfgs.mean()), 4),
        "fgsm_mean_l2": round(float(fgsm.mean()), 4),
        "lbfgs_smaller_share": round(float((lbfgs < fgsm).mean()), 4),
    }


def transfer_stage(
    options: EvaluateOptions,
    mut: ModelUnderTest,
    sets: ImageSets,
    found: AttackSetsFound,
    log: Log,
) -> None:
    """Adversarials crafted on another model (its exported sets), kept where they fool this
    one: the attacker without our weights. Missing when the other model was not evaluated."""
    for other in options.transfer_from:
        path = export_path(options.cache_dir, other)
        if not path.is_file():
            log(f"no transfer sets: {path} is missing (run the evaluation of {other} first)")
            continue
        exported = load_attack_sets(path)
        for attack in TRANSFER_ATTACKS:
            if attack not in exported.attacks or attack not in exported.rows:
                continue
            source_rows = exported.authentic_rows[exported.rows[attack]]
            truth = sets.split.labels[source_rows]
            images = exported.attacks[attack].astype(np.float32) / 255.0
            predicted = attacks.predict(mut.classifier, torch.from_numpy(images))
            attacked = sets.predictions[source_rows] == truth  # this model's photo, right
            fooled = transfer_successes(predicted, sets.predictions[source_rows], truth)
            name = f"transfer_{attack}"
            found.adversarial[name] = images[fooled]
            found.stats[name] = {
                "params": {"crafted_on": other, "attack": attack},
                "attempted": int(attacked.sum()),
                "succeeded": int(fooled.sum()),
                "failed": int((attacked & ~fooled).sum()),
                "target_reached": 0,
                "target_rate": 0.0,
                "mean_l2": None,
                "mean_linf": None,
                "seconds": 0.0,
                "cached": True,
            }
            log(f"{name} from {other}: {int(fooled.sum())}/{int(attacked.sum())} fool {mut.name}")


def transfer_successes(
    predicted: np.ndarray, clean_predicted: np.ndarray, truth: np.ndarray
) -> np.ndarray:
    """Which transferred adversarials count against the judged model: those made from a photo
    it classifies correctly, and that it misclassifies. Without the first condition its own
    clean errors counted as transfer successes (13% of the FGSM transfer sets when found)."""
    kept: np.ndarray = (clean_predicted == truth) & (predicted != truth)
    return kept


def configuration_stage(
    options: EvaluateOptions, mut: ModelUnderTest, log: Log
) -> dict[str, tuple[DetectorConfig, Guard]]:
    """Every detector configuration as a Guard: the paper's Table 2 grid, layer study, k sweep
    and multi-layer Fisher bundle (studies), the v2 bundles (the default, ``v2-flip`` and
    ``v2-median``), and views of the all-statistics bundle (ablations) that need no build of
    their own."""
    guards: dict[str, tuple[DetectorConfig, Guard]] = {}
    if not options.studies:
        config = DetectorConfig("bundle", "table2", tuple(mut.base_guard.layers))
        guards[config.name] = (config, mut.base_guard)
        return guards
    configs = detector_configs(mut.info.default_layer, mut.stage_layers)
    if options.v2_only:  # the paper's default and v2: the comparison without the studies
        configs = [paper_config(mut.info.default_layer)]
    for config in configs:
        path = build_configuration(options, mut.arch, mut.weights, config, mut.name, log)
        guards[config.name] = (config, Guard.load(path, device="cpu"))
        for view_config, view in layer_views(
            config, path, guards[config.name][1], mut.info.default_layer
        ):
            guards[view_config.name] = (view_config, view)
    if mut.info.family == "cifar":
        for preset in V2_PRESETS:
            v2 = DetectorConfig(preset, "v2", (), preset=preset)
            path = build_configuration(options, mut.arch, mut.weights, v2, mut.name, log)
            guards[v2.name] = (v2, Guard.load(path, device="cpu"))
        if options.v2_only:
            return guards
        every = DetectorConfig("all-statistics", "ablation", (), statistics=ALL_STATISTICS)
        path = build_configuration(options, mut.arch, mut.weights, every, mut.name, log)
        for view_config, view in statistic_views(path):
            guards[view_config.name] = (view_config, view)
    return guards


def feature_stage(
    mut: ModelUnderTest, sets: ImageSets, found: AttackSetsFound
) -> dict[str, BatchFeatures]:
    """Features of every set at every hooked layer, computed once."""
    feats: dict[str, BatchFeatures] = {
        "authentic": infer_in_batches(mut.network, sets.x_auth),
        "errors": infer_in_batches(mut.network, sets.split.tensor(sets.selection.errors)),
    }
    for name, pixels in found.adversarial.items():
        feats[name] = infer_in_batches(mut.network, torch.from_numpy(pixels))
    return feats


def adaptive_stage(
    options: EvaluateOptions,
    mut: ModelUnderTest,
    sets: ImageSets,
    found: AttackSetsFound,
    guards: dict[str, tuple[DetectorConfig, Guard]],
    feats: dict[str, BatchFeatures],
    log: Log,
    timings: dict[str, float],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """White-box PGD against the paper's default detector ("adaptive", also scored by every other
    configuration as a transfer attack), the multi-layer Fisher bundle and each v2 preset: for
    each target, the attack (cached) -> its set's features -> what a user of that detector
    meets. Returns (each set's outcome, configuration -> own-attack column -> the set crafted
    against it)."""
    base_key = attack_key(mut, sets, options.seed)
    info: dict[str, dict[str, Any]] = {}
    targets = adaptive_targets(options, mut, guards)
    for set_name, cname in targets.items():
        guard = guards[cname][1]
        started = time.perf_counter()
        output = _adaptive_attack(options, mut, sets, found, guard, set_name, base_key, log)
        feats[set_name] = infer_in_batches(
            mut.network, torch.from_numpy(found.adversarial[set_name])
        )
        info[set_name] = adaptive_outcome(guard, mut, sets, output)
        timings[f"attack_{set_name}_seconds"] = time.perf_counter() - started
        log(f"{set_name}: {info[set_name]}")
    return info, own_attack_columns(targets)


def adaptive_targets(
    options: EvaluateOptions, mut: ModelUnderTest, guards: dict[str, tuple[DetectorConfig, Guard]]
) -> dict[str, str]:
    """Adaptive set -> the configuration it attacks (none with ``options.adaptive`` off)."""
    if not options.adaptive:
        return {}
    default_name = f"pca_whiten-{mut.info.default_layer}-k1000"
    targets = {"adaptive": default_name if default_name in guards else "bundle"}
    for preset in V2_PRESETS:  # v2 -> adaptive_v2, v2-median -> adaptive_v2_median, ...
        if preset in guards:
            set_name = "adaptive_" + preset.replace("-", "_")
            targets[set_name] = preset
            targets[f"{set_name}_l2"] = preset  # the smooth variant (PGD-L2)
    for cname, (config, _) in guards.items():
        if config.study == "multilayer":
            targets["adaptive_multilayer"] = cname
    return targets


def own_attack_columns(targets: dict[str, str]) -> dict[str, dict[str, str]]:
    """Adaptive set -> attacked configuration, turned into configuration -> own-attack column
    (``adaptive_own`` for PGD-Linf, ``adaptive_own_l2`` for the smooth sets) -> the first set
    crafted against it in that norm."""
    own: dict[str, dict[str, str]] = {}
    for set_name, cname in targets.items():
        column = OWN_ADAPTIVE_COLUMNS[1] if set_name.endswith("_l2") else OWN_ADAPTIVE_COLUMNS[0]
        own.setdefault(cname, {}).setdefault(column, set_name)
    return own


def _adaptive_attack(
    options: EvaluateOptions,
    mut: ModelUnderTest,
    sets: ImageSets,
    found: AttackSetsFound,
    guard: Guard,
    set_name: str,
    base_key: dict[str, Any],
    log: Log,
) -> attacks.AttackOutput:
    """The white-box PGD against ``guard``'s detector (every statistic's surrogate), from the
    cache when the same attack on the same detector files ran before; recorded in ``found``."""
    p = options.attack
    layers = surrogates(guard.detector)
    smooth = set_name.endswith("_l2")
    budget: dict[str, Any] = (
        {"eps": p.adaptive_l2_eps, "alpha": p.adaptive_l2_alpha, "steps": p.adaptive_l2_steps}
        if smooth
        else {"eps": p.adaptive_eps, "alpha": p.adaptive_alpha, "steps": p.adaptive_steps}
    )
    params = {
        **budget,
        "weight": p.adaptive_weight,
        **({"norm": "l2"} if smooth else {}),  # the Linf attack's cache key as before
        "detector": guard.manifest.files,
    }

    def run() -> attacks.AttackOutput:
        return adaptive_pgd(
            mut.network,
            layers,
            sets.x_auth,
            sets.targets,
            budget["eps"],
            budget["alpha"],
            budget["steps"],
            p.adaptive_weight,
            options.batch_size,
            options.seed,
            norm="l2" if smooth else "linf",
        )

    output, hit = cached_attack(
        options.cache_dir / "adversarials", {**base_key, "attack": set_name, **params}, run
    )
    shown = {k: v for k, v in params.items() if k != "detector"}
    record_attack(found, mut, sets, set_name, shown, output, hit, log)
    return output


def adaptive_outcome(
    guard: Guard, mut: ModelUnderTest, sets: ImageSets, output: attacks.AttackOutput
) -> dict[str, Any]:
    """What a user of ``guard`` meets, over every attempted image (not only the successes): the
    number to believe is the share misclassified AND accepted at the bundle's threshold."""
    every = infer_in_batches(mut.network, torch.from_numpy(output.adversarial))
    accepted = guard_scores(guard, every, None) >= guard.threshold
    misclassified = every.predictions != sets.y_auth
    return {
        "detector": guard.manifest.name,
        "threshold": guard.threshold,
        "retention": guard.manifest.calibration.operating_retention,
        "attempted": int(sets.y_auth.size),
        "misclassified": round(float(misclassified.mean()), 4),
        "target_reached": round(float((every.predictions == sets.selection.targets).mean()), 4),
        "misclassified_and_accepted": round(float((misclassified & accepted).mean()), 4),
    }


def score_stage(
    guards: dict[str, tuple[DetectorConfig, Guard]],
    feats: dict[str, BatchFeatures],
    own_adaptive: dict[str, dict[str, str]],
) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, np.ndarray]]]]:
    """Every configuration scores every set; EER accuracy, AUROC, TPR at 5% FPR, and the share
    accepted at the configuration's own threshold."""
    set_names = [s for s in SET_ORDER if s in feats or s in ("aggr", *OWN_ADAPTIVE_COLUMNS)]
    configurations: dict[str, Any] = {}
    all_scores: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    memo: StatisticMemo = {}
    for cname, (config, guard) in guards.items():
        single_vote = guard.detector.combination == "single" and isinstance(
            guard.detector.statistics[0], KnnVote
        )
        functions: tuple[ScoreFunction | None, ...] = SCORE_FUNCTIONS if single_vote else (None,)
        by_function: dict[str, Any] = {}
        all_scores[cname] = {}
        for function in functions:
            key = function or guard.manifest.detector.score_function
            scores = {
                name: guard_scores(guard, batch, function, memo) for name, batch in feats.items()
            }
            for column, set_name in own_adaptive.get(cname, {}).items():
                scores[column] = scores[set_name]
            scores["aggr"] = np.concatenate([scores["lbfgs"], scores["fgsm"]])
            all_scores[cname][key] = scores
            by_function[key] = {
                name: set_metrics(scores["authentic"], scores[name]).as_dict()
                for name in set_names
                if name in scores and scores[name].size
            }
        mine = all_scores[cname][guard.manifest.detector.score_function]
        configurations[cname] = {
            **asdict(config),
            "bundle": guard.manifest.name,
            "statistics": guard.detector.names,
            "combination": guard.detector.combination,
            "score_function": guard.manifest.detector.score_function,
            "threshold": guard.threshold,
            "retention": guard.manifest.calibration.operating_retention,
            "metrics": by_function,
            "authentic_mean_score": {
                function: round(float(scores["authentic"].mean()), 4)
                for function, scores in all_scores[cname].items()
            },
            "accepted_at_threshold": {
                name: round(float((mine[name] >= guard.threshold).mean()), 4)
                for name in ["authentic", *set_names]
                if name in mine and mine[name].size
            },
        }
    return configurations, all_scores


def evaluate(options: EvaluateOptions, log: Log = print) -> dict[str, Any]:
    """model -> sets -> attacks (+ transfer) -> configurations -> features -> adaptive attacks
    -> scores -> reports."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(options.seed)
    t0 = time.perf_counter()
    mut = model_stage(options, log)
    sets = sets_stage(options, mut, log)
    timings["data_seconds"] = time.perf_counter() - t0
    found = attack_stage(options, mut, sets, log, timings)
    transfer_stage(options, mut, sets, found, log)
    t0 = time.perf_counter()
    guards = configuration_stage(options, mut, log)
    timings["build_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats = feature_stage(mut, sets, found)
    adaptive_info, own_adaptive = adaptive_stage(
        options, mut, sets, found, guards, feats, log, timings
    )
    exported = export_attack_sets(
        export_path(options.cache_dir, mut.name),
        sets.selection,
        found.adversarial,
        found.rows,
        str(options.source),
    )
    log(f"attack sets for `advguard simulate` in {exported}")
    configurations, all_scores = score_stage(guards, feats, own_adaptive)
    timings["scoring_seconds"] = time.perf_counter() - t0
    return report_stage(
        options, mut, sets, found, adaptive_info, configurations, all_scores, timings, started, log
    )


def best_table2(configurations: dict[str, Any]) -> tuple[str, str]:
    """(configuration, score function) of the Table 2 study with the highest aggregate EER
    accuracy: the one the figures show."""
    candidates = [
        (m["aggr"]["eer_accuracy"], cname, function)
        for cname, c in configurations.items()
        if c["study"] == "table2"
        for function, m in c["metrics"].items()
    ]
    _, best_name, best_function = max(candidates)
    return best_name, best_function


def results_document(
    options: EvaluateOptions,
    mut: ModelUnderTest,
    sets: ImageSets,
    found: AttackSetsFound,
    adaptive_info: dict[str, dict[str, Any]],
    configurations: dict[str, Any],
) -> dict[str, Any]:
    """results.json's content, before the run times are added."""
    best_name, best_function = best_table2(configurations)
    return {
        "bundle": mut.name,
        "model": {"arch": mut.arch, "weights_sha256": mut.manifest.model.weights_sha256},
        "quick": options.quick,
        "seed": options.seed,
        "source": str(options.source),
        "test_images": len(sets.split.keys),
        "test_accuracy": round(sets.test_accuracy, 4),
        "per_class": options.per_class,
        "sets": {
            "authentic": int(sets.selection.authentic.size),
            "errors": int(sets.selection.errors.size),
        },
        "attacks": found.stats,
        "lbfgs_vs_fgsm": found.lbfgs_vs_fgsm,
        "adaptive": adaptive_info,
        "configurations": configurations,
        "best": {"configuration": best_name, "score_function": best_function},
        "paper_table2_pca_dwknn": {"lbfgs": 0.865, "fgsm": 0.835, "aggr": 0.850, "errors": 0.636},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }


def report_stage(
    options: EvaluateOptions,
    mut: ModelUnderTest,
    sets: ImageSets,
    found: AttackSetsFound,
    adaptive_info: dict[str, dict[str, Any]],
    configurations: dict[str, Any],
    all_scores: dict[str, dict[str, dict[str, np.ndarray]]],
    timings: dict[str, float],
    started: float,
    log: Log,
) -> dict[str, Any]:
    """results.json, table2.md, the figures (best Table 2 configuration) and SUMMARY.md."""
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    results = results_document(options, mut, sets, found, adaptive_info, configurations)
    best = results["best"]
    best_name, best_function = best["configuration"], best["score_function"]
    report.write_figures(
        all_scores[best_name][best_function],
        best_name,
        best_function,
        configurations[best_name],
        out,
    )
    timings["total_seconds"] = time.perf_counter() - started
    # attack time when each adversarial set was first computed (cached sets cost nothing now)
    timings["attacks_when_computed_seconds"] = sum(a["seconds"] for a in found.stats.values())
    results["runtime"] = {k: round(v, 1) for k, v in timings.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table2.md").write_text(report.markdown(results))
    if not options.quick:
        text = report.summary(out.parent)
        if text is not None:
            (out.parent / "SUMMARY.md").write_text(text)
    log(f"wrote {out}/table2.md, results.json and figures in {timings['total_seconds']:.0f} s")
    return results
