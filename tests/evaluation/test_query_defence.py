"""The issue-13 table and plot from stateful_eval's per-run replays (no attack is rerun)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.query_defence import (
    CLOSED_LOOP_PLOT,
    ClosedLoopCheck,
    closed_loop_check,
    detection_check,
    detection_curves,
    earliest_detection,
    first_detections,
    floor_rows,
    main,
    rows,
    table,
)
from evaluation.stateful_eval import choose
from evaluation.stateful_replay import SequenceOutcome, succeeds_despite, summarise_outcomes


def test_a_run_survives_refusal_only_when_it_succeeded_before_its_detection() -> None:
    assert succeeds_despite(SequenceOutcome(first_match=2, detection=7, success=3))
    assert not succeeds_despite(SequenceOutcome(first_match=2, detection=7, success=7))
    assert not succeeds_despite(SequenceOutcome(first_match=2, detection=7, success=500))
    assert succeeds_despite(SequenceOutcome(first_match=None, detection=None, success=40))
    assert not succeeds_despite(SequenceOutcome(first_match=3, detection=None, success=None))


def test_a_run_detected_at_its_successful_query_counts_as_caught_not_strictly() -> None:
    """The successful query is screened before it is answered: detected then, it is caught."""
    at_success = SequenceOutcome(first_match=2, detection=7, success=7)
    summary = summarise_outcomes([at_success, SequenceOutcome(2, 9, 3)])
    assert summary["detected_before_success"] == 0.5
    assert summary["detected_strictly_before_success"] == 0.0
    assert summary["succeeded_despite_detection"] == 0.5


def test_curves_count_runs_detected_and_succeeded_by_each_query() -> None:
    runs = [[2, 7, 3], [3, 7, None], [None, None, 40]]
    queries, detected, succeeded = detection_curves(runs, horizon=50)
    assert queries[0] == 1 and queries[-1] == 50
    assert detected[5] == 0 and detected[6] == 2 / 3 and detected[-1] == 2 / 3
    assert succeeded[1] == 0 and succeeded[2] == 1 / 3 and succeeded[39] == 2 / 3


def _summary() -> dict[str, Any]:
    single = [SequenceOutcome(2, 7, 3), SequenceOutcome(3, 7, None), SequenceOutcome(3, 8, 20)]
    spread = [SequenceOutcome(2, 9, 3), SequenceOutcome(3, None, None), SequenceOutcome(3, 8, 20)]

    def runs(outcomes: list[SequenceOutcome]) -> list[list[int | None]]:
        return [[o.first_match, o.detection, o.success] for o in outcomes]

    keys = [
        f"{a}/{s}" for a in ("square", "hopskipjump", "boundary") for s in ("guard_off", "guard_on")
    ]
    chosen = {
        "attacks": {k: summarise_outcomes(single) for k in keys},
        "sybil": {k: summarise_outcomes(spread) for k in keys},
        "outcomes": {k: {"single": runs(single), "sybil": runs(spread)} for k in keys},
    }
    chosen["rule"] = {"client_matches": 5, "global_matches": 4}
    return {
        "chosen": "fp",
        "schemes": {"fp": chosen},
        "sybil_ids": 50,
        "horizon": 30,
        "command": "python -m evaluation.stateful_eval",
    }


def test_rows_give_each_attack_its_settings_and_the_stateful_layer(tmp_path: Path) -> None:
    table = rows(_summary())
    assert len(table) == 3 * 2 * 3
    plain, one_id, sybil = table[0], table[1], table[2]
    assert (plain.attack, plain.defence) == ("square", "no guard")
    assert plain.success_rate == 2 / 3 and plain.median_queries_to_success == 11.5
    assert plain.succeeded_despite_detection is None
    assert one_id.defence == "no guard + stateful, 1 id"
    assert one_id.succeeded_despite_detection == 1 / 3  # the run that succeeded at query 3
    assert one_id.median_queries_to_detection == 7 and one_id.detected_before_success == 2 / 3
    # of the two runs that succeed (at queries 3 and 20), only the later one is caught first
    assert one_id.caught_of_successful == 1 / 2
    assert sybil.defence == "no guard + stateful, 50 ids"
    assert np.isclose(sybil.detected_before_success, 1 / 3)


def test_the_floor_counts_runs_that_succeed_before_the_rule_can_detect() -> None:
    """min(5, 4) = 4 matches: nothing before query 5 is detected; of the three runs, the one
    that succeeded at query 3 survives under any fingerprint, the one at 20 does not."""
    summary = _summary()
    assert earliest_detection(summary) == 5
    summary["schemes"]["fp"]["rule"]["changed_matches"] = 2  # a changed answer from 2 matches
    assert earliest_detection(summary) == 3
    summary["schemes"]["fp"]["rule"]["changed_matches"] = None
    floors = floor_rows(summary)
    assert len(floors) == 6
    attack, defence, floor, actual = floors[0]
    assert (attack, defence) == ("square", "no guard")
    assert floor == 1 / 3 and actual == 1 / 3


def test_the_command_writes_the_table_and_the_plot(tmp_path: Path) -> None:
    (tmp_path / "stateful.json").write_text(json.dumps(_summary()))
    assert main(["--results", str(tmp_path)]) == 0
    markdown = (tmp_path / "defence.md").read_text()
    assert "| square | guard (v2) + stateful, 50 ids | 67% | 12 | 8 |" in markdown
    assert "| boundary | guard (v2) | 33% | 33% |" in markdown  # the floor table
    assert (tmp_path / "time_to_detection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_fingerprint_is_chosen_among_the_kinds_the_service_runs() -> None:
    def result(share: float, median: float) -> dict[str, Any]:
        attack = {"detected_before_success": share, "median_queries_to_detection": median}
        return {"attacks": {"square/guard_on": attack}}

    results = {"ph": result(0.99, 3), "wh-a": result(0.9, 9), "wh-b": result(0.9, 7)}
    kinds = {"ph": "phash", "wh-a": "window_hash", "wh-b": "window_hash"}
    assert choose(results, kinds) == "wh-b"  # ph scores best but the service cannot run it


def test_the_table_shows_closed_loop_counts_beside_the_replay_on_the_guarded_rows() -> None:
    live = {
        "boundary/silent/in_process": {"live_success": 18, "images": 100},
        "boundary/refuse/in_process": {"live_success": 0, "images": 100},
        "square/refuse/in_process_50ids": {"live_success": 27, "images": 100},
        "square/refuse": {"live_success": 5, "images": 20},  # over HTTP: not a table cell
    }
    lines = table(_summary(), live).splitlines()
    by_defence = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in lines}
    boundary = by_defence[("boundary", "guard (v2) + stateful, 1 id")]
    assert boundary.endswith("| 33% | 0/100 | 18/100 |")  # replayed, refuse, silent
    square_spread = by_defence[("square", "guard (v2) + stateful, 50 ids")]
    assert square_spread.endswith("| 27/100 | – |")
    assert by_defence[("square", "guard (v2) + stateful, 1 id")].endswith("| – | – |")
    assert by_defence[("boundary", "no guard + stateful, 1 id")].endswith("| – | – |")
    without_live = table(_summary()).splitlines()
    assert len(without_live) == len(lines) > 2  # the same rows, each without a live count
    assert all(line.endswith("| – | – |") for line in without_live[2:])


def test_a_closed_loop_count_under_another_rule_says_which() -> None:
    # _summary's rule is (5, 4, -): a check recorded under it, or before rules were recorded,
    # is a plain count; one run under another rule carries that rule
    same = {"live_success": 3, "images": 100, "rule": [5, 4, None]}
    other = {"live_success": 27, "images": 100, "rule": [5, 5, 4]}
    close = {"live_success": 0, "images": 100, "rule": [5, 4, None], "close_radius": 9}
    cases = (
        (same, "3/100"),
        (other, "27/100 (rule 5, 5, 4)"),
        (close, "0/100 (rule 5, 4, -, close copies within 9)"),  # the replay had none
    )
    for check, cell in cases:
        line = next(
            line
            for line in table(_summary(), {"square/refuse/in_process": check}).splitlines()
            if "| square | guard (v2) + stateful, 1 id |" in line
        )
        assert line.endswith(f"| {cell} | – |")


def test_a_closed_loop_count_gives_its_detection_figures_when_it_saw_them() -> None:
    check = {
        "live_success": 1,
        "images": 50,
        "screened": 50,
        "detected_before_success": 49,
        "median_queries_to_detection": 7.0,
    }
    line = next(
        line
        for line in table(_summary(), {"hopskipjump/refuse/in_process": check}).splitlines()
        if "| hopskipjump | guard (v2) + stateful, 1 id |" in line
    )
    assert line.endswith("| 1/50; flagged before success 49/50, median 7 queries | – |")


def test_a_closed_loop_count_with_runs_cut_short_is_a_lower_bound() -> None:
    """Runs ended by ``--stall-asks`` (not the query cap) might still have succeeded."""
    cells = {}
    for stalled in (0, 48):
        check = {"live_success": 2, "images": 50, "stalled": stalled}
        line = next(
            line
            for line in table(_summary(), {"boundary/refuse/in_process": check}).splitlines()
            if "| boundary | guard (v2) + stateful, 1 id |" in line
        )
        cells[stalled] = line.rsplit("|", 3)[1].strip()
    assert cells == {0: "2/50", 48: "2/50 (at least; 48 cut short)"}


def _check(images: int, success: int = 0, median: float = 7.0, stalled: int = 0) -> dict[str, Any]:
    """A check's record; each image first flagged at the median query (``per_image``)."""
    return {
        "images": images,
        "live_success": success,
        "stalled": stalled,
        "screened": images,
        "detected_before_success": images - success,
        "median_queries_to_detection": median,
        "per_image": [{"screened": True, "first_detection": int(median)}] * images,
    }


def _recorded_checks() -> dict[str, Any]:
    checks = {
        "boundary/refuse/in_process_from200": _check(50, stalled=48),
        "boundary/refuse/in_process_from250": _check(50, stalled=47),
        "boundary/refuse/in_process_50ids_from200": _check(50, success=1, median=9.0),
        "boundary/silent/in_process_from200": _check(60, median=8.0),
        "boundary/refuse": _check(5),  # over HTTP: never a closed-loop row
    }
    pools = (  # as policy_check --pool records them: keyed by, and listing, their checks
        (["boundary/refuse/in_process_from200", "boundary/refuse/in_process_from250"], 95),
        # a pool that mixes spreads belongs to neither
        (["boundary/refuse/in_process_from250", "boundary/refuse/in_process_50ids_from200"], 0),
    )
    pooled = {
        " + ".join(keys): _check(100, stalled=stalled) | {"checks": keys} for keys, stalled in pools
    }
    return {"checks": checks, "pooled": pooled}


def test_the_closed_loop_check_is_the_one_over_most_images_of_its_policy_and_spread() -> None:
    recorded_checks = _recorded_checks()
    one_id = closed_loop_check(recorded_checks, "boundary", "refuse", 1)
    assert one_id is not None
    assert one_id.key == "boundary/refuse/in_process_from200 + boundary/refuse/in_process_from250"
    assert one_id.picks == "picks 200-299" and one_id.result["stalled"] == 95
    spread = closed_loop_check(recorded_checks, "boundary", "refuse", 50)
    assert spread is not None and spread.key == "boundary/refuse/in_process_50ids_from200"
    assert spread.picks == "picks 200-249"
    silent = closed_loop_check(recorded_checks, "boundary", "silent", 1)
    assert silent is not None and silent.picks == "picks 200-259"
    assert closed_loop_check(recorded_checks, "boundary", "silent", 50) is None
    assert closed_loop_check(recorded_checks, "square", "refuse", 1) is None


def test_the_closed_loop_command_writes_the_live_table_beside_the_checks(tmp_path: Path) -> None:
    runs_dir = tmp_path / "guard-only"
    runs_dir.mkdir()
    runs = {
        "boundary/guard_off": {"images": 100, "succeeded": 45, "median_queries_to_success": 652},
        "boundary/guard_on": {"images": 100, "succeeded": 3, "median_queries_to_success": 900.5},
    }
    (runs_dir / "results.json").write_text(json.dumps({"images": 100, "runs": runs}))
    (tmp_path / "policy_check.json").write_text(json.dumps(_recorded_checks()))
    assert main(["--closed-loop", "--attack-runs", str(runs_dir), "--results", str(tmp_path)]) == 0
    lines = (tmp_path / "defence_closed_loop.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| boundary |")]
    assert rows == [
        "| boundary | no guard | picks 0-99 | 45/100 | 652 | – | – | – | – |",
        "| boundary | guard (v2) | picks 0-99 | 3/100 | 900 | – | – | – | – |",
        "| boundary | guard (v2) + stateful, 1 id | picks 200-299 (refuse), picks 200-259 (silent) "
        "| – | – | 7 | 100/100 | 0/100 (at least; 95 cut short) | 0/60 |",
        "| boundary | guard (v2) + stateful, 50 ids | picks 200-249 | – | – | 9 | 49/50 | 1/50 "
        "| – |",
    ]
    assert not any(line.startswith("| square |") for line in lines)  # nothing ran: no row
    # the time-to-detection plot, drawn from the same checks, is written and shown
    assert (tmp_path / CLOSED_LOOP_PLOT).stat().st_size > 0
    assert f"![time to detection, as run]({CLOSED_LOOP_PLOT})" in lines


def test_the_closed_loop_command_draws_no_plot_without_a_stateful_check(tmp_path: Path) -> None:
    runs = {"boundary/guard_off": {"images": 4, "succeeded": 1, "median_queries_to_success": 9}}
    (tmp_path / "results.json").write_text(json.dumps({"images": 4, "runs": runs}))
    (tmp_path / "policy_check.json").write_text(json.dumps({"checks": {}, "pooled": {}}))
    assert main(["--closed-loop", "--results", str(tmp_path)]) == 0
    assert not (tmp_path / CLOSED_LOOP_PLOT).exists()
    assert "time to detection" not in (tmp_path / "defence_closed_loop.md").read_text()


def test_first_detections_read_a_pool_image_by_image_and_skip_unscreened_images() -> None:
    first = "boundary/refuse/in_process_from0"
    second = "boundary/refuse/in_process_from2"
    checks = {
        first: {
            "images": 2,
            "per_image": [
                {"screened": True, "first_detection": 7},
                {"screened": True, "first_detection": None},  # never flagged
            ],
        },
        second: {
            "images": 2,
            "per_image": [
                {"screened": False, "first_detection": None},  # the screening's outcome unseen
                {"screened": True, "first_detection": 12},
            ],
        },
        "boundary/silent/in_process_from0": _check(3, median=5.0),
    }
    pooled = {f"{first} + {second}": {"images": 4, "checks": [first, second]}}
    recorded_checks = {"checks": checks, "pooled": pooled}
    refuse = detection_check(recorded_checks, "boundary", 1)
    assert refuse is not None and refuse.key == f"{first} + {second}"
    assert first_detections(recorded_checks, refuse) == [7, None, 12]
    alone = ClosedLoopCheck(first, checks[first], "picks 0-1")
    assert first_detections(recorded_checks, alone) == [7, None]
    # no refuse check: the detections come from silent's, as the table's row does
    del recorded_checks["pooled"], checks[first], checks[second]
    silent = detection_check(recorded_checks, "boundary", 1)
    assert silent is not None and silent.key == "boundary/silent/in_process_from0"
    assert first_detections(recorded_checks, silent) == [5, 5, 5]
