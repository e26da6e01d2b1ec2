"""advguard simulate's pure parts: the traffic plan, the replay through the tracker, the figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main as advguard_main
from app.core.flagging import ClassScale, FlagPolicy, WindowParams
from app.core.guard import Guard
from evaluation.attacks import LogitsModel, fgsm_untargeted, predict
from evaluation.data import load_split
from evaluation.sets import Selection, export_attack_sets
from evaluation.simulate import (
    HONEST,
    ClientPlan,
    PolicyOutcome,
    ScoredPool,
    TimeToFlag,
    choose_default,
    honest_by_class,
    judge,
    plan_population,
    plan_stress_population,
    replay,
    wilson_interval,
)
from evaluation.simulate_cli import is_loopback
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE, REPO
from tests.deploy.helpers import advguard_serve, free_tcp_port


def _pool(scores: list[float], threshold: float = 0.2) -> ScoredPool:
    values = np.array(scores, dtype=np.float64)
    n = len(values)
    return ScoredPool(
        np.zeros((n, 3, 2, 2), np.uint8), values, values >= threshold, np.zeros(n, np.int64)
    )


def test_population_plan() -> None:
    sizes = {HONEST: 1000, "fgsm": 50}
    plans = plan_population(sizes, ["fgsm"], 4, 3, 20, 5, seed=0)
    assert plans == plan_population(sizes, ["fgsm"], 4, 3, 20, 5, seed=0)
    kinds = [p.kind for p in plans]
    assert kinds.count(HONEST) == 4 and kinds.count("fgsm") == 3 and kinds.count("mixed-fgsm") == 3
    assert len({p.client_id for p in plans}) == len(plans)
    for plan in plans:
        assert len(plan.requests) == 20
        pools = [pool for pool, _ in plan.requests]
        if plan.kind == HONEST:
            assert set(pools) == {HONEST}
            rows = [row for _, row in plan.requests]
            assert len(set(rows)) == 20  # distinct images while the pool allows
        elif plan.kind == "fgsm":
            assert set(pools) == {"fgsm"}
        else:  # exactly one adversarial in five, at every fifth request
            assert [i for i, p in enumerate(pools) if p == "fgsm"] == [4, 9, 14, 19]
        assert all(0 <= row < sizes[pool] for pool, row in plan.requests)


def test_stress_population_plan() -> None:
    """Warmed attackers: W honest requests, then the attack, counted from there; one-class
    honest clients: only photos of their class."""
    sizes = {HONEST: 60, "pgd": 30}
    labels = np.arange(60) % 3
    plans = plan_stress_population(sizes, ["pgd"], labels, ["a", "b", "c"], [5, 8], 2, 4, 12, 0)
    assert plans == plan_stress_population(
        sizes, ["pgd"], labels, ["a", "b", "c"], [5, 8], 2, 4, 12, 0
    )
    kinds = [p.kind for p in plans]
    assert kinds.count("warm5-pgd") == kinds.count("warm8-pgd") == 2
    assert kinds.count("honest-a") == kinds.count("honest-b") == kinds.count("honest-c") == 4
    assert len({p.client_id for p in plans}) == len(plans)
    for plan in plans:
        assert len(plan.requests) == 12
        pools = [pool for pool, _ in plan.requests]
        if plan.kind.startswith("warm"):
            warm = int(plan.kind[4 : plan.kind.index("-")])
            assert pools == [HONEST] * warm + ["pgd"] * (12 - warm)
            assert plan.attack_starts == warm + 1
        else:
            label = "abc".index(plan.kind[-1])
            assert set(pools) == {HONEST} and plan.attack_starts == 1
            assert all(labels[row] == label for _, row in plan.requests)
    with pytest.raises(ValueError, match="leaves no attack"):
        plan_stress_population(sizes, ["pgd"], labels, ["a"], [12], 1, 0, 12, 0)


def test_a_warmed_attacker_is_timed_from_its_first_adversarial() -> None:
    pools = {HONEST: _pool([0.6, 0.5]), "pgd": _pool([0.0])}
    policy = FlagPolicy("mean", 0.3, min_requests=4, window=WindowParams())
    warm = [(HONEST, 0)] * 6 + [("pgd", 0)] * 24
    plans = [
        ClientPlan("w", "warm6-pgd", warm, attack_starts=7),
        ClientPlan("early", "warm6-pgd", [("pgd", 0)] * 30, attack_starts=7),  # flagged at 4
        ClientPlan("h", "honest-a", [(HONEST, 1)] * 30),
        ClientPlan("g", HONEST, [(HONEST, 0)] * 30),
    ]
    # the mean after 6 x 0.6 and n x 0.0 falls below 0.3 at n = 7, request 13
    assert replay(plans, pools, policy)["w"] == 13
    outcome = judge(plans, pools, policy, checkpoints=[10])
    assert outcome.times_by_kind["warm6-pgd"] == [7, 1]  # flagged before its attack: at 1
    assert outcome.honest_kinds == {"honest-a": (0, 1)}
    assert "honest-a" not in outcome.attackers and outcome.honest_flagged[30] == 0.0


def test_replay_flags_attackers_at_min_requests_and_not_honest_clients() -> None:
    pools = {HONEST: _pool([0.6, 0.5, 0.55, 0.45]), "pgd": _pool([0.0, 0.01])}
    policy = FlagPolicy("mean", 0.3, min_requests=4, window=WindowParams())
    plans = [
        ClientPlan("sim-honest-0", HONEST, [(HONEST, i % 4) for i in range(30)]),
        ClientPlan("sim-pgd-0", "pgd", [("pgd", i % 2) for i in range(30)]),
        ClientPlan(
            "sim-mixed-pgd-0",
            "mixed-pgd",
            [("pgd", 0) if i % 2 else (HONEST, 0) for i in range(30)],
        ),
    ]
    flagged = replay(plans, pools, policy)
    assert flagged == {"sim-honest-0": None, "sim-pgd-0": 4, "sim-mixed-pgd-0": None}
    outcome = judge(plans, pools, policy, checkpoints=[10])
    assert outcome.honest_flagged == {10: 0.0, 30: 0.0}
    assert outcome.attackers["pgd"] == TimeToFlag(1, 4.0, 4.0, 0.0)
    assert outcome.attackers["mixed-pgd"].median is None  # mean 0.3 is not below 0.3
    assert outcome.attackers["mixed-pgd"].never_share == 1.0


def test_replay_ranks_each_score_among_its_predicted_class() -> None:
    """With a class scale the tracker averages per-class p-values: a client of a low-scoring
    class is ordinary, an attacker far below the class it claims is not."""
    honest = ScoredPool(
        np.zeros((4, 3, 2, 2), np.uint8),
        np.array([0.1, 0.12, 0.6, 0.65]),
        np.ones(4, dtype=bool),
        np.array([0, 0, 1, 1]),
    )
    attack = ScoredPool(
        np.zeros((1, 3, 2, 2), np.uint8), np.array([0.3]), np.ones(1, dtype=bool), np.array([1])
    )
    reference = np.array([0.05, 0.08, 0.1, 0.12, 0.15, 0.55, 0.6, 0.65, 0.7, 0.8])
    scale = ClassScale.fit(reference, np.repeat(np.array([0, 1]), 5), min_class=5)
    plans = [
        ClientPlan("low-class", HONEST, [(HONEST, i % 2) for i in range(20)]),
        ClientPlan("attacker", "pgd", [("pgd", 0)] * 20),
    ]
    pools = {HONEST: honest, "pgd": attack}
    raw = FlagPolicy("mean", 0.25, min_requests=4)
    assert replay(plans, pools, raw) == {"low-class": 4, "attacker": None}
    per_class = FlagPolicy("mean", 0.25, min_requests=4, scale=scale)
    # class 0's 0.1 and 0.12 rank 3rd and 4th of 5 (p 4/6, 5/6); class 1's 0.3 is below all 5
    assert replay(plans, pools, per_class) == {"low-class": None, "attacker": 4}


def test_honest_by_class_reads_the_flag_values_of_each_true_class() -> None:
    pool = ScoredPool(
        np.zeros((5, 3, 2, 2), np.uint8),
        np.array([0.1, 0.3, 0.5, 0.7, 0.9]),
        np.ones(5, dtype=bool),
        np.array([0, 1, 1, 1, 0]),  # true classes below: 0, 0, 1, 1, 1
    )
    labels = np.array([0, 0, 1, 1, 1])
    raw = honest_by_class(pool, labels, ["a", "b"], FlagPolicy("mean", 0.0))
    assert raw["a"] == {"accuracy": 0.5, "mean_flag_value": 0.2, "correct": 0.1, "errors": 0.3}
    assert raw["b"]["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert raw["b"]["errors"] == 0.9 and raw["b"]["correct"] == 0.6
    scale = ClassScale.fit(np.array([0.2, 0.4, 0.6, 0.8]), np.array([0, 0, 1, 1]), min_class=1)
    ranked = honest_by_class(pool, labels, ["a", "b"], FlagPolicy("mean", 0.0, scale=scale))
    # class a: 0.1 among (0.2, 0.4) -> 1/3; 0.3 predicted b, among (0.6, 0.8) -> 1/3
    assert ranked["a"]["mean_flag_value"] == pytest.approx(1 / 3, abs=1e-4)


def test_time_to_flag_quantiles_count_never() -> None:
    t = TimeToFlag.of([3, 5, None, 7, None])
    assert (t.median, t.p90, t.never_share) == (7.0, None, 0.4)
    assert TimeToFlag.of([None, None]).median is None


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(0, 2000)
    assert lo == 0.0 and hi == pytest.approx(0.00192, abs=1e-4)
    lo, hi = wilson_interval(10, 2000)
    assert lo < 0.005 < hi and lo == pytest.approx(0.00272, abs=1e-4)


def _outcome(
    kind: str,
    honest: float,
    medians: dict[str, float | None],
    one_class: dict[str, tuple[int, int]] | None = None,
) -> PolicyOutcome:
    policy = FlagPolicy(kind, 0.0)  # type: ignore[arg-type]
    attackers = {a: TimeToFlag(10, m, m, 0.0 if m else 1.0) for a, m in medians.items()}
    return PolicyOutcome(policy, {200: honest}, (0.0, 1.0), attackers, {}, one_class or {})


def test_default_is_the_fastest_policy_within_the_false_flag_budget() -> None:
    outcomes = {
        "mean": _outcome("mean", 0.001, {"fgsm": 30.0, "pgd": 10.0}),
        "cusum": _outcome("cusum", 0.004, {"fgsm": 15.0, "pgd": 12.0}),
        "ewma": _outcome("ewma", 0.02, {"fgsm": 5.0, "pgd": 5.0}),  # too many honest flags
        "rejection_rate": _outcome("rejection_rate", 0.0, {"fgsm": None, "pgd": 10.0}),
    }
    assert choose_default(outcomes, ["fgsm", "pgd"], 0.005) == "cusum"  # type: ignore[arg-type]
    assert choose_default(outcomes, ["fgsm", "pgd"], 0.0) == "rejection_rate"  # type: ignore[arg-type]


def test_default_reads_histories_and_one_class_clients_when_measured() -> None:
    """The slowest median across histories counts, and the one-class honest clients together
    must stay within the false-flag budget too."""
    fresh_fast = {"fgsm": 10.0, "warm20-fgsm": 30.0, "pgd": 10.0, "warm20-pgd": 12.0}
    steady = {"fgsm": 12.0, "warm20-fgsm": 12.0, "pgd": 12.0, "warm20-pgd": 12.0}
    fastest = {"fgsm": 8.0, "warm20-fgsm": 8.0, "pgd": 8.0, "warm20-pgd": 8.0}
    outcomes = {
        "ewma": _outcome("ewma", 0.0, fresh_fast, {"honest-a": (1, 200), "honest-b": (0, 200)}),
        "ewma_anchored": _outcome("ewma_anchored", 0.0, steady, {"honest-a": (2, 400)}),
        "cusum": _outcome("cusum", 0.0, fastest, {"honest-a": (3, 200), "honest-b": (0, 200)}),
    }
    pure = ["fgsm", "pgd"]
    # cusum flags 3 of 400 one-class clients (0.75% > 0.5%); ewma's slowest medians are 30, 12
    assert choose_default(outcomes, pure, 0.005, [20]) == "ewma_anchored"  # type: ignore[arg-type]
    # fresh attackers alone: ewma (10, 10) beats ewma_anchored (12, 12)
    assert choose_default(outcomes, pure, 0.005) == "ewma"  # type: ignore[arg-type]
    # a looser budget admits cusum
    assert choose_default(outcomes, pure, 0.01, [20]) == "cusum"  # type: ignore[arg-type]


def test_live_runs_only_on_loopback() -> None:
    assert is_loopback("http://127.0.0.1:8000") and is_loopback("http://localhost:1")
    assert is_loopback("http://[::1]:8000")
    assert not is_loopback("http://10.0.0.5:8000") and not is_loopback("http://example.com")


def test_recorded_command_withholds_the_admin_token() -> None:
    from evaluation.simulate_cli import command_line

    assert command_line(["--url", "http://127.0.0.1:1", "--admin-token", "s3cret"]) == (
        "advguard simulate --url http://127.0.0.1:1 --admin-token <admin token>"
    )
    assert "s3cret" not in command_line(["--admin-token=s3cret"])


@pytest.mark.slow
def test_the_simulate_command_replays_every_policy_and_writes_its_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``advguard simulate`` end to end on the demo bundle: the test split and an exported set of
    FGSM adversarials scored by the guard, a small population replayed under all five policies,
    the default chosen by its rule, results.json, table.md and the time-to-flag figure; then the
    same with a few live clients driving a running ``advguard serve`` (``--url``)."""
    guard = Guard.load(DEMO_BUNDLE, device="cpu")
    cache_dir = REPO / ".cache" / "evaluation"  # the decoded test split, shared with other tests
    split = load_split(CIFAR_TAR, "test", guard.preset, cache_dir / "data")
    rows = np.arange(60)
    labels = torch.from_numpy(split.labels[rows])
    model = LogitsModel(guard.network).eval()
    adversarial = fgsm_untargeted(model, split.tensor(rows), labels, 8 / 255).adversarial
    fooled = predict(model, torch.from_numpy(adversarial)) != split.labels[rows]
    selection = Selection(rows, np.array([], dtype=np.int64), np.zeros(len(rows), np.int64))
    sets = export_attack_sets(
        tmp_path / "sets.npz",
        selection,
        {"fgsm_untargeted": adversarial[fooled]},
        {"fgsm_untargeted": np.flatnonzero(fooled)},
        str(CIFAR_TAR),
    )
    out = tmp_path / "simulation"
    argv = ["simulate", "--bundle", str(DEMO_BUNDLE), "--source", str(CIFAR_TAR)]
    argv += ["--cache-dir", str(cache_dir), "--sets", str(sets), "--out", str(out)]
    argv += ["--honest-clients", "200", "--attack-clients", "20", "--requests", "40"]
    argv += ["--warm-ups", "20", "--class-clients", "3"]
    assert advguard_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["outcomes"]) == {
        "mean",
        "ewma",
        "ewma_anchored",
        "rejection_rate",
        "cusum",
        "ewma_shift",
    }
    shifted = results["outcomes"]["ewma_shift"]["policy"]
    assert shifted["shift_threshold"] > 0 and shifted["shift_allowance"] > 0
    assert results["outcomes"]["ewma"]["policy"]["shift_threshold"] is None
    assert results["pools"]["fgsm_untargeted"]["images"] == int(fooled.sum()) > 0
    assert results["pools"][HONEST]["images"] == len(split.labels)
    assert results["honest_clients"] == 200 and results["requests"] == 40
    assert results["default_policy"] in results["outcomes"]
    assert results["flag_per_class"] is True  # the demo bundle has its scores' classes
    table = (out / "table.md").read_text()
    both = f"{shifted['threshold']:.4g} / {shifted['shift_threshold']:.4g}"
    assert f"| ewma_shift | {both} |" in table or f"| ewma_shift (default) | {both} |" in table
    assert "average each request's per-class p-value" in table
    assert f"| {split.classes[0]} | " in table  # honest test photos by true class
    assert set(results["honest_by_class"]) == set(split.classes)
    assert "fgsm_untargeted" in table and "mixed-fgsm_untargeted" in table
    assert "| warm20-fgsm_untargeted |" in table  # attackers with an honest history
    assert f"| honest-{split.classes[0]} (of 3) |" in table  # one-class honest clients
    honest_kinds = results["outcomes"]["ewma"]["honest_kinds"]
    assert len(honest_kinds) == len(split.classes)
    assert all(k["clients"] == 3 for k in honest_kinds.values())
    assert (out / "time_to_flag.png").read_bytes().startswith(b"\x89PNG")
    missing = [*argv[:7], "--sets", str(tmp_path / "none.npz"), *argv[9:]]
    missing[missing.index(str(out))] = str(tmp_path / "refused")
    capsys.readouterr()
    assert advguard_main(missing) == 2  # one line, exit 2, and it says how to make them
    assert not (tmp_path / "refused").exists()  # and leaves no empty --out behind
    err = capsys.readouterr().err
    assert (
        err.startswith("advguard simulate: error: no exported attack sets") and err.count("\n") == 1
    )
    assert "advguard evaluate" in err

    # --url: a few clients also drive a running service, whose tracker must hold what the
    # replay of its own answers predicts
    port, admin_port = free_tcp_port(), free_tcp_port()
    env = {"ADVGUARD_ADMIN_TOKEN": "s3cret-admin", "ADVGUARD_EXPOSE_SCORES": "true"}
    live = ["--url", f"http://127.0.0.1:{port}", "--admin-url", f"http://127.0.0.1:{admin_port}"]
    live += ["--admin-token", "s3cret-admin", "--live-honest-clients", "6"]
    live += ["--live-attack-clients", "1", "--live-requests", "15", "--concurrency", "2"]
    with advguard_serve(port, tmp_path / "serve.log", env, admin_port=admin_port):
        assert advguard_main([*argv, *live]) == 0
    served = json.loads((out / "results.json").read_text())["live"]
    assert served["clients"] == 6 + 1 + 1  # honest, the pure and the mixed FGSM client
    assert served["all_answered_200"] and served["counts_match"] and served["flags_match"]
    command = json.loads((out / "results.json").read_text())["command"]
    assert command.startswith("advguard simulate --bundle ") and "--live-requests 15" in command
    assert "--admin-token <admin token>" in command and "s3cret" not in command  # hidden
    assert advguard_main([*argv, "--url", "http://10.0.0.1:8000"]) == 2  # loopback only

    # --raw-scores: the policies of a service with ADVGUARD_FLAG_PER_CLASS=false
    assert advguard_main([*argv, "--raw-scores"]) == 0
    raw = json.loads((out / "results.json").read_text())
    assert raw["flag_per_class"] is False
    assert "average the guard's raw scores" in (out / "table.md").read_text()
    ewma = raw["outcomes"]["ewma"]["policy"]["threshold"]
    assert ewma != pytest.approx(results["outcomes"]["ewma"]["policy"]["threshold"])


def test_a_warm_up_as_long_as_the_requests_is_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert advguard_main(["simulate", "--requests", "10", "--warm-ups", "5", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advguard simulate: error: --warm-ups must be below --requests (10)")
