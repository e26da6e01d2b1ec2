"""The live policy check: its bookkeeping, and the in-process closed loop (``ScreenedOracle``)
against the service's own screening, in process and over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from app.core.guard import Guard
from app.core.stateful.defaults import DEFAULT_RULE
from app.core.stateful.match_rule import DetectionReason, DetectionRule
from evaluation.policy_check import (
    ImageCheck,
    ScreenedOracle,
    check_served_bundle,
    checked_rule,
    compare,
    detections,
    first_detection,
    first_detection_detail,
    http_oracles,
    main,
    oracle_label,
    own_answers,
    pool,
    record,
    replay_predictions,
    result_key,
    rule_counts,
    rule_record,
    stateful_file,
    summarise,
    table,
    truly_adversarial,
    withheld,
)
from evaluation.query_oracles import DECISIONS, Answer, GuardOracle, HttpOracle
from evaluation.query_runs import AttackRecord
from evaluation.stateful_replay import EVALUATION_SECRET
from tests.conftest import DEMO_BUNDLE
from tests.service.helpers import RedisProcess, free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "app" / "service" / "static" / "examples"


def test_predictions_follow_the_replay_of_each_run_in_order() -> None:
    stateful = {
        "chosen": "fp",
        "schemes": {
            "fp": {
                "outcomes": {
                    "square/guard_on": {
                        "single": [[2, 7, 3], [3, 7, None], [3, 7, 9], [None, None, 4]]
                    }
                }
            }
        },
    }
    assert replay_predictions(stateful, "square") == [True, False, False, True]


def test_summary_counts_agreement_per_image() -> None:
    checks = [
        ImageCheck(1, True, True, 5, 0, True),
        ImageCheck(2, False, False, 1000, 990, True),  # stopped on a silent answer's lie
        ImageCheck(3, False, True, 40, 12, True),
    ]
    summary = summarise(checks)
    assert (summary["images"], summary["live_success"], summary["predicted_success"]) == (3, 2, 1)
    assert summary["believed_success"] == 3
    assert summary["same_outcome"] == 2 and summary["per_image"][1]["answers_withheld"] == 990


def test_detection_before_success_counts_flags_at_or_before_the_success() -> None:
    """In closed loop a run is detected before its first success when the first flag comes at
    or before the success it stopped on (screened before it is answered), or at all in a run
    that never succeeds; runs that did not see the screening (HTTP) count in neither."""

    def check(detection: int | None, success: int | None, screened: bool = True) -> ImageCheck:
        return ImageCheck(0, None, success is not None, 10, 0, success is not None, "cap",
                          screened, detection, success)  # fmt: skip

    checks = [
        check(3, None),  # never succeeded, flagged at its 3rd query
        check(7, 7),  # flagged at the query that would have succeeded
        check(8, 7),  # flagged after its success
        check(None, None),  # never flagged, never succeeded
        check(2, None, screened=False),  # over HTTP: not known
    ]
    assert [c.detected_before_success for c in checks[:4]] == [True, True, False, False]
    summary = summarise(checks)
    assert summary["screened"] == 4 and summary["detected"] == 3
    assert summary["detected_before_success"] == 2
    assert summary["median_queries_to_detection"] == 7.0
    assert "screened" not in summarise([check(2, None, screened=False)])
    assert first_detection([False, False, True, True]) == 3
    assert first_detection([False, False, False]) is None


def served_record(queries: np.ndarray, served: list[Answer]) -> AttackRecord:
    """A recorded run of ``queries`` that was served ``served``, one each, with no success."""
    return AttackRecord(
        attack="square",
        row=0,
        label=0,
        original=queries[0],
        queries=queries,
        decisions=np.array([DECISIONS.index(a.decision) for a in served], dtype=np.int8),
        classes=np.array(
            [-1 if a.class_index is None else a.class_index for a in served], np.int16
        ),
        probabilities=np.full(len(queries), np.nan, dtype=np.float32),
        first_success=-1,
        stopped="cap",
        seconds=0.0,
    )


def test_withheld_counts_answers_that_differ_from_the_guards_own() -> None:
    guard = Guard.load(DEMO_BUNDLE, device="cpu")
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    own = GuardOracle(guard).ask(queries)
    served = [own[0], Answer("refused"), own[2]]  # what a 403 under refuse records
    record = served_record(queries, served)
    assert withheld(record, own) == 1
    assert withheld(record, own_answers(GuardOracle(guard), record, guard)) == 1


def test_a_success_counts_only_when_the_guard_itself_is_fooled() -> None:
    """Under silent the served answer may be the anchor's: the attack stops on what it was
    told, and the check asks the guard itself about that query."""
    guard = Guard.load(DEMO_BUNDLE, device="cpu")
    noise = np.random.default_rng(1).integers(0, 256, size=(1, 3, 32, 32), dtype=np.uint8)
    photos = [  # the demo page's authentic examples: the bundle accepts them
        np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
        for path in sorted(EXAMPLES.glob("authentic-*.png"))
    ]
    queries = np.concatenate([np.stack(photos), noise])
    own = GuardOracle(guard).ask(queries)
    assert sum(a.decision == "accepted" for a in own) == 3

    def record(first_success: int, label: int) -> AttackRecord:
        n = len(queries)
        return AttackRecord(
            attack="boundary",
            row=0,
            label=label,
            original=queries[0],
            queries=queries,
            decisions=np.zeros(n, dtype=np.int8),
            classes=np.full(n, -1, dtype=np.int16),
            probabilities=np.full(n, np.nan, dtype=np.float32),
            first_success=first_success,
            stopped="success" if first_success >= 0 else "cap",
            seconds=0.0,
        )

    assert not truly_adversarial(record(-1, 0), own)
    for i, answer in enumerate(own):
        if answer.decision == "accepted":
            assert answer.class_index is not None
            assert truly_adversarial(record(i, (answer.class_index + 1) % 10), own)
            assert not truly_adversarial(record(i, answer.class_index), own)
        else:  # rejected: no class, nothing to hold
            assert not truly_adversarial(record(i, 0), own)


# --------------------------------------------------------------------------- the closed loop


@pytest.fixture(scope="module")
def guard() -> Guard:
    return Guard.load(DEMO_BUNDLE, device="cpu")


def probes(count: int) -> np.ndarray:
    """An accepted demo photo, then ``count - 1`` edits of it by one grey level in one pixel
    each: distinct uploads, all near-duplicates of each other (what a query attack sends)."""
    picture = Image.open(EXAMPLES / "authentic-airplane-0000.png").convert("RGB")
    photo = np.asarray(picture).transpose(2, 0, 1)
    out = np.repeat(photo[None], count, axis=0).astype(np.int16)
    for i in range(1, count):
        out[i, 0, i, i] += 1 if out[i, 0, i, i] < 255 else -1
    return out.astype(np.uint8)


def labels(answers: list[Answer]) -> list[tuple[str, int | None]]:
    """Decision and class: probabilities differ in the last bits between batch sizes."""
    return [(a.decision, a.class_index) for a in answers]


def test_screened_oracle_answers_as_the_guard_until_the_rule_detects(guard: Guard) -> None:
    """Under ``refuse`` the first queries get the guard's own answers; from the one with
    ``client_matches`` distinct earlier near-duplicates on, 403s; the same over 50 Sybil ids
    (the global count); under ``silent`` the anchor's answer instead of a refusal."""
    queries = probes(DEFAULT_RULE.client_matches + 3)
    own = GuardOracle(guard).ask(queries)
    detected_from = DEFAULT_RULE.client_matches  # 0-based: that many earlier near-duplicates
    for ids in (1, 50):
        oracle = ScreenedOracle(guard, "refuse", [f"c{i}" for i in range(ids)])
        answers = [oracle.ask(queries[i : i + 1])[0] for i in range(len(queries))]
        oracle.close()
        assert labels(answers[:detected_from]) == labels(own[:detected_from])
        assert {a.decision for a in answers[detected_from:]} == {"refused"}
        # the screening's outcomes, query by query: the first flag is the first refusal
        assert len(oracle.outcomes) == len(queries)
        assert first_detection(detections(oracle, "refuse") or []) == detected_from + 1
        # one id: its own count flags it; fifty ids (one query each so far): everyone's count
        reason = "client_matches" if ids == 1 else "global_matches"
        rejected = sum(a.decision == "rejected" for a in own[:detected_from])
        assert first_detection_detail(oracle, detected_from + 1) == (reason, rejected)
        assert first_detection_detail(oracle, None) == (None, None)
    oracle = ScreenedOracle(guard, "silent", ["one"])
    batched = oracle.ask(queries)  # one batch is screened as one query at a time would be
    oracle.close()
    assert labels(batched[:detected_from]) == labels(own[:detected_from])
    anchor = batched[0]  # the photo itself, as it was answered in this batch
    assert all(a == anchor for a in batched[detected_from:])
    # not by chance: the guard's own answers to those edits carry other probabilities
    assert all(a.probability != anchor.probability for a in own[detected_from:])


def test_screened_oracle_screens_with_the_rule_it_is_given(guard: Guard) -> None:
    """A check's rule (``--changed-rejected``'s, here a lower count) reaches the screening."""
    queries = probes(5)
    oracle = ScreenedOracle(guard, "refuse", ["one"], DetectionRule(2, 2))
    answers = [oracle.ask(queries[i : i + 1])[0] for i in range(len(queries))]
    oracle.close()
    assert [a.decision == "refused" for a in answers] == [False, False, True, True, True]


def test_in_process_the_guards_own_answers_are_those_the_screening_was_given(
    guard: Guard,
) -> None:
    """``own_answers`` reads the in-process oracle's record instead of asking the guard again:
    the same decisions and classes as asking again, the served ones differing where the policy
    answered (here ``refuse``'s 403s), and a record of another length is refused."""
    queries = probes(DEFAULT_RULE.client_matches + 3)
    oracle = ScreenedOracle(guard, "refuse", ["one"])
    served = [oracle.ask(queries[i : i + 1])[0] for i in range(len(queries))]
    oracle.close()
    run = served_record(queries, served)
    own = own_answers(oracle, run, guard)
    assert own is oracle.own
    assert labels(own) == labels(GuardOracle(guard).ask(queries))
    assert withheld(run, own) == sum(
        (a.decision, a.class_index) != (b.decision, b.class_index)
        for a, b in zip(served, own, strict=True)
    )
    assert withheld(run, own) == len(queries) - DEFAULT_RULE.client_matches  # the 403s
    shorter = AttackRecord(**{**run.__dict__, "queries": queries[:-1]})
    with pytest.raises(RuntimeError, match="answered"):
        own_answers(oracle, shorter, guard)


def test_the_first_detections_detail_counts_the_guards_own_rejections_before_it(
    guard: Guard,
) -> None:
    """The rejections counted are the guard's own decisions on the queries *before* the first
    flag (the flagged query's own is not counted), and the reason is the flagged query's."""
    oracle = ScreenedOracle(guard, "refuse", ["one"])
    oracle.close()
    oracle.own = [
        Answer("rejected" if r else "accepted", None if r else 1, None if r else 0.9)
        for r in (True, False, True, True, False)
    ]
    oracle.reasons = [None, None, None, "changed_answer", "client_matches"]
    assert first_detection_detail(oracle, 4) == ("changed_answer", 2)
    assert first_detection_detail(oracle, 5) == ("client_matches", 3)
    assert first_detection_detail(oracle, 1) == (None, 0)


def test_a_results_directory_without_the_replay_reads_the_default_ones(tmp_path: Path) -> None:
    """A check's own stateful.json if its results directory holds one, else the default
    directory's (the replay's results, written there by evaluation.stateful_eval)."""
    default = Path("evaluation/results/query-attacks/stateful.json")
    assert stateful_file(tmp_path) == default and default.is_file()
    (tmp_path / "stateful.json").write_text("{}")
    assert stateful_file(tmp_path) == tmp_path / "stateful.json"


def test_result_keys_name_how_the_queries_were_answered() -> None:
    assert oracle_label(result_key("square", "refuse", False, 1)) == "HTTP + Redis"
    assert oracle_label(result_key("square", "refuse", True, 1)) == "in process"
    assert oracle_label(result_key("boundary", "silent", True, 50)) == "in process, 50 ids"
    assert (
        oracle_label(result_key("square", "refuse", True, 1, 100)) == "in process, from image 100"
    )
    assert result_key("square", "refuse", True, 50, 100) == "square/refuse/in_process_50ids_from100"


def test_images_the_replay_never_saw_are_counted_without_a_prediction() -> None:
    """``--first-image`` past the recorded runs: the live counts stand, the replay's are None
    (the table shows "-"), and a mix counts the predictions it has."""
    fresh = [
        ImageCheck(7, None, True, 2, 0, True, "success"),
        ImageCheck(8, None, False, 9, 3, False),
    ]
    assert summarise(fresh) | {"per_image": None} == {
        "images": 2,
        "believed_success": 1,
        "live_success": 1,
        "predicted_success": None,
        "same_outcome": None,
        "stalled": 0,
        "per_image": None,
    }
    mixed = summarise([*fresh, ImageCheck(9, True, True, 2, 0, True, "success")])
    assert (mixed["predicted_success"], mixed["same_outcome"]) == (1, 1)


@pytest.mark.slow
def test_screened_oracle_gives_what_the_service_gives_over_http(
    guard: Guard, tmp_path: Path
) -> None:
    """The same uploads to ``advguard serve`` (stateful detection on, ``refuse``, the
    evaluation's secret) and to the in-process closed loop: the same answers, refusals included."""
    from tests.deploy.helpers import advguard_serve
    from tests.service.helpers import free_port

    queries = probes(DEFAULT_RULE.client_matches + 3)
    port = free_port()
    env = {
        "ADVGUARD_TORCH_THREADS": "1",
        "ADVGUARD_STATEFUL_POLICY": "refuse",
        "ADVGUARD_STATEFUL_SECRET": EVALUATION_SECRET.decode(),
    }
    with advguard_serve(port, tmp_path / "serve.log", env, "--log-level", "warning"):
        http = HttpOracle(f"http://127.0.0.1:{port}", client_id="attacker", max_queries=50)
        try:
            over_http = http.ask(queries)
        finally:
            http.close()
    check_served_bundle(http.served_bundle, guard)  # the demo bundle, as the check's default
    oracle = ScreenedOracle(guard, "refuse", ["attacker"])
    in_process = oracle.ask(queries)
    oracle.close()
    assert labels(over_http) == labels(in_process)
    assert over_http[-1].decision == "refused"
    # the detections a client sees over HTTP under refuse (403 query_refused) are the screening's
    assert detections(http, "refuse") == detections(oracle, "refuse")
    assert http.refusals[-1] == "query_refused" and http.refusals[0] is None
    assert detections(http, "silent") is None  # under silent a detection does not show


def test_a_service_or_redis_off_loopback_is_refused_before_anything_is_flushed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], guard: Guard
) -> None:
    """--redis-url is flushed before each image: it was flushed before --url was checked, and
    was never checked itself."""
    server = RedisProcess(free_port(), tmp_path)
    server.start()
    try:
        _refused_before_the_flush(server.url, capsys, guard)
    finally:
        server.kill()


def _refused_before_the_flush(
    local_redis: str, capsys: pytest.CaptureFixture[str], guard: Guard
) -> None:
    store = redis.Redis.from_url(local_redis)
    store.set("someone-else", "theirs")
    for url, redis_url in (
        ("http://10.1.2.3:8000", local_redis),
        ("http://127.0.0.1:8000", "redis://10.1.2.3:6379/0"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(["--url", url, "--redis-url", redis_url, "--policy", "refuse"])
        assert exited.value.code == 2
        assert "is not a loopback address" in capsys.readouterr().err
    with pytest.raises(ValueError, match="loopback only"):
        http_oracles("http://10.1.2.3:8000", store, guard)
    assert store.get("someone-else") == b"theirs"


def test_a_check_is_added_to_the_results_file_as_it_is_now(tmp_path: Path) -> None:
    """Two checks run side by side each write when one attack ends: the later writer keeps the
    row the other wrote meanwhile, and replaces only its own key."""

    def summary(images: int) -> dict[str, object]:
        return summarise([ImageCheck(i, False, False, 10, 0, True) for i in range(images)])

    record(tmp_path, "square/refuse/in_process", summary(1))
    record(tmp_path, "boundary/refuse/in_process", summary(2))  # another process's row
    record(tmp_path, "square/refuse/in_process", summary(3))
    checks = json.loads((tmp_path / "policy_check.json").read_text())["checks"]
    assert {key: row["images"] for key, row in checks.items()} == {
        "square/refuse/in_process": 3,
        "boundary/refuse/in_process": 2,
    }
    table = (tmp_path / "policy_check.md").read_text()
    assert "| square | refuse | in process | 3 |" in table
    assert "| boundary | refuse | in process | 2 |" in table


def test_the_table_names_each_checks_rule_and_close_copies() -> None:
    """A row's rule column: the counts, then the close-copy radius for checks run since close
    copies exist; rows without one ran before them; HTTP checks: the service's settings."""
    row = summarise([ImageCheck(0, False, False, 10, 0, True)])
    results = {
        "checks": {
            "square/refuse/in_process": row | {"rule": [5, 5, 2, 1], "close_radius": 9},
            "square/refuse/in_process_from100": row | {"rule": [5, 5, 2, 1]},
            "square/silent/in_process": row | {"rule": [5, 5, 2, None], "close_radius": 0},
            "square/refuse": row,
        }
    }
    lines = table(results).splitlines()
    assert "close-copy radius" in lines[0]
    assert lines[2].endswith("| the service's settings |")
    assert lines[3].endswith("| 5, 5, 2, 1, 9 |")
    assert lines[4].endswith("| 5, 5, 2, 1 |")
    assert lines[5].endswith("| 5, 5, 2, -, 0 |")
    counting = row | {"rule": [5, 5, 2, 1], "close_radius": 9, "changed_includes_rejected": True}
    counting_lines = table({"checks": {"square/refuse/in_process": counting}}).splitlines()
    assert counting_lines[2].endswith("| 5, 5, 2, 1, 9, changed counts rejections |")


def test_the_checked_rule_is_the_default_unless_rejections_count() -> None:
    assert checked_rule(False) == DEFAULT_RULE
    counting = checked_rule(True)
    assert counting.changed_includes_rejected and not DEFAULT_RULE.changed_includes_rejected
    assert rule_counts(counting) == rule_counts(DEFAULT_RULE)  # the counts themselves alike
    counts = rule_counts(DEFAULT_RULE)
    assert rule_record(DEFAULT_RULE) == {"rule": counts}
    assert rule_record(counting) == {"rule": counts, "changed_includes_rejected": True}


def test_counting_rejections_is_an_in_process_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        over_http = ["--url", "http://127.0.0.1:1", "--redis-url", "redis://127.0.0.1:2"]
        main([*over_http, "--policy", "refuse", "--changed-rejected"])
    assert "--changed-rejected: with --in-process" in capsys.readouterr().err


def test_the_table_gives_the_closed_loops_detection_figures() -> None:
    """Detected before first success over the screened runs and the median queries to
    detection; "-" for rows that did not see the screening (HTTP, or run before it was kept)."""
    flagged = ImageCheck(0, None, False, 10, 0, False, "cap", True, 4, None)
    late = ImageCheck(1, None, True, 3, 0, True, "success", True, 9, 3)
    results = {
        "checks": {
            "square/refuse/in_process": summarise([flagged, late]) | {"rule": [5, 5, 2, 1]},
            "square/refuse": summarise([ImageCheck(0, False, False, 10, 0, True)]),
        }
    }
    lines = table(results).splitlines()
    assert "| detected before first success | median queries to detection |" in lines[0]
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert "| 0 | - | - | the service's settings |" in lines[2]
    assert "| 0 | 1/2 | 6.5 | 5, 5, 2, 1 |" in lines[3]


def _screened_check(
    rows: range, detections: list[int | None], **fields: object
) -> dict[str, object]:
    """A recorded in-process check over ``rows`` whose runs were first flagged at
    ``detections`` (None: never), none of them a success."""
    checks = [
        ImageCheck(row, None, False, 2500, 0, False, "cap", True, at, None)
        for row, at in zip(rows, detections, strict=True)
    ]
    alike = {"rule": [5, 5, 2, 1], "close_radius": 9, "bundle_manifest_sha256": "ab12"}
    return summarise(checks) | alike | fields


def test_pooled_checks_are_one_check_over_all_their_images(tmp_path: Path) -> None:
    """Pooling takes the median over every image's first flag (not a median of medians) and
    sums the counts; it goes into the results file and its table, and running one of its checks
    again drops it."""
    first = _screened_check(range(0, 2), [4, 12])  # median 8
    second = _screened_check(range(2, 5), [9, 10, None])  # median 9.5
    checks = {"hopskipjump/refuse/in_process": first, "hopskipjump/refuse/in_process_from2": second}
    (tmp_path / "policy_check.json").write_text(json.dumps({"checks": checks}))
    keys = list(checks)
    assert main(["--pool", *keys, "--results", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "policy_check.json").read_text())
    pooled = results["pooled"][" + ".join(keys)]
    assert pooled["images"] == 5
    assert (pooled["screened"], pooled["detected"], pooled["detected_before_success"]) == (5, 4, 4)
    assert pooled["median_queries_to_detection"] == 9.5  # of 4, 9, 10, 12
    assert pooled["checks"] == keys and pooled["rule"] == [5, 5, 2, 1]
    text = (tmp_path / "policy_check.md").read_text()
    assert "## Checks pooled image by image" in text
    assert (
        "| hopskipjump | refuse | in process; in process, from image 2 | 5 | 0 | 0 | 4/5 | 9.5 "
        "| 5, 5, 2, 1, 9 |" in text
    )
    assert "How the first detections came" not in text  # recorded before they were kept
    record(tmp_path, "square/refuse/in_process", first)  # another check: the pool stays
    assert json.loads((tmp_path / "policy_check.json").read_text())["pooled"]
    record(tmp_path, keys[1], second)  # one of its checks again: the pool goes
    assert json.loads((tmp_path / "policy_check.json").read_text())["pooled"] == {}
    assert "pooled image by image" not in (tmp_path / "policy_check.md").read_text()


def test_how_the_first_detections_came_is_summed_and_pooled(tmp_path: Path) -> None:
    """Runs by the part of the rule that first flagged them and the mean of the guard's own
    rejections before that flag, per check and pooled image by image, in the table; runs never
    flagged count in neither."""

    def check(
        rows: range, by: list[DetectionReason | None], rejected: list[int | None]
    ) -> list[ImageCheck]:
        return [
            ImageCheck(
                row, None, False, 2500, 0, False, "cap", True, None if b is None else 9, None, b, r
            )
            for row, b, r in zip(rows, by, rejected, strict=True)
        ]

    first = summarise(check(range(0, 2), ["client_matches", "changed_answer"], [4, 1]))
    second = summarise(check(range(2, 5), ["client_matches", None, "client_matches"], [2, None, 5]))
    assert first["first_detections_by"] == {
        "client_matches": 1,
        "global_matches": 0,
        "changed_answer": 1,
        "blend": 0,
    }
    assert first["mean_rejected_before_detection"] == 2.5
    alike = {"rule": [5, 5, 2, 1], "close_radius": 9, "bundle_manifest_sha256": "ab12"}
    checks = {
        "hopskipjump/refuse/in_process": first | alike,
        "hopskipjump/refuse/in_process_from2": second | alike,
    }
    (tmp_path / "policy_check.json").write_text(json.dumps({"checks": checks}))
    assert main(["--pool", *checks, "--results", str(tmp_path)]) == 0
    pooled = next(iter(json.loads((tmp_path / "policy_check.json").read_text())["pooled"].values()))
    assert pooled["first_detections_by"]["client_matches"] == 3
    assert pooled["mean_rejected_before_detection"] == 3.0  # of 4, 1, 2 and 5
    text = (tmp_path / "policy_check.md").read_text()
    assert "## How the first detections came (in process)" in text
    assert "| hopskipjump | refuse | in process | 2 | 1 / 0 / 1 / 0 | 2.5 |" in text
    assert (
        "| hopskipjump | refuse | in process; in process, from image 2 | 4 | 3 / 0 / 1 / 0 | 3 |"
        in text
    )


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (("hopskipjump/refuse/in_process_from2", {"rule": [5, 5, 4, 1]}), "share their rule"),
        (("hopskipjump/refuse/in_process_from2", {"close_radius": 0}), "close_radius"),
        (
            ("hopskipjump/refuse/in_process_from2", {"changed_includes_rejected": True}),
            "changed_includes_rejected",
        ),
        (("hopskipjump/refuse/in_process_from2", {"blends": True}), "blends"),
        (("hopskipjump/refuse/in_process_from2", {"bundle_manifest_sha256": "cd34"}), "bundle"),
        (("boundary/refuse/in_process_from2", {}), "attack and policy"),
        (("hopskipjump/silent/in_process_from2", {}), "attack and policy"),
        (("hopskipjump/refuse/in_process_from1", {}), "some image twice"),
    ],
)
def test_pooling_refuses_checks_that_measured_different_things(
    second: tuple[str, dict[str, object]], message: str
) -> None:
    key, fields = second
    rows = range(1, 3) if key.endswith("from1") else range(2, 4)
    results = {
        "checks": {
            "hopskipjump/refuse/in_process": _screened_check(range(0, 2), [4, 12]),
            key: _screened_check(rows, [9, 10], **fields),
        }
    }
    with pytest.raises(ValueError, match=message):
        pool(results, list(results["checks"]))


def test_pooling_needs_two_recorded_in_process_checks() -> None:
    http = summarise([ImageCheck(2, None, False, 10, 0, False)])  # over HTTP: not screened
    results = {
        "checks": {
            "square/refuse/in_process": _screened_check(range(0, 2), [4, 12]),
            "square/refuse/in_process_from2": http
            | {"rule": [5, 5, 2, 1], "close_radius": 9, "bundle_manifest_sha256": "ab12"},
        }
    }
    with pytest.raises(ValueError, match="at least two"):
        pool(results, ["square/refuse/in_process"])
    with pytest.raises(ValueError, match="not recorded"):
        pool(results, ["square/refuse/in_process", "square/refuse/in_process_from9"])
    with pytest.raises(ValueError, match="in process"):
        pool(results, list(results["checks"]))


def test_a_check_needs_a_policy_unless_it_pools(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--in-process", "--attacks", "square"])
    assert "--policy is required" in capsys.readouterr().err


class _LoadingError(Exception):
    """Raised in place of loading the bundle: the check got that far."""


def test_a_check_sets_torchs_threads_before_it_loads_the_bundle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checks run side by side, one per core: torch's default (every core) in each made them
    contend; so the count is set, one by default, before the model is loaded."""

    def load(*_args: object, **_kwargs: object) -> Guard:
        raise _LoadingError(torch.get_num_threads())

    monkeypatch.setattr(Guard, "load", load)
    before = torch.get_num_threads()
    try:
        for argv, threads in (([], 1), (["--threads", "3"], 3)):
            torch.set_num_threads(2)
            with pytest.raises(_LoadingError) as loading:
                main(["--in-process", "--policy", "silent", *argv])
            assert loading.value.args == (threads,)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["--in-process", "--policy", "silent", "--threads", "0"])


def test_a_service_serving_another_bundle_is_refused(guard: Guard) -> None:
    """The check's bundle picks the images and judges the successes: a service answering with
    another (another name, detector or classes) would make its outcomes meaningless."""
    served = {
        "name": guard.manifest.name,
        "statistics": guard.detector.names,
        "combination": guard.manifest.detector.combination,
        "class_names": list(guard.class_names),
    }
    check_served_bundle(served, guard)
    for field, other in (
        ("name", "other"),
        ("statistics", ["vote@layer3.2"]),
        ("combination", "single"),
    ):
        with pytest.raises(ValueError, match=f"differs in {field}"):
            check_served_bundle(served | {field: other}, guard)


class _PickedError(Exception):
    """Raised in place of picking the images: which guard picked."""


def test_a_pick_bundle_picks_the_images_and_the_bundle_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``--pick-bundle``: the images (and so the attacker's starting photos) are chosen by that
    bundle, the answers come from ``--bundle``; a pick bundle of another model is refused."""
    from evaluation import policy_check

    load = Guard.load
    loaded: dict[str, Guard] = {}

    def recording_load(path: Path, *args: object, **kwargs: object) -> Guard:
        loaded[str(path)] = load(path, device="cpu")
        return loaded[str(path)]

    def picking(guard: Guard, *_args: object) -> np.ndarray:
        raise _PickedError(guard)

    monkeypatch.setattr(Guard, "load", recording_load)
    monkeypatch.setattr(policy_check, "pick_images", picking)
    copy = tmp_path / "copy"
    copy.symlink_to(DEMO_BUNDLE)
    argv = ["--in-process", "--policy", "refuse", "--bundle", str(DEMO_BUNDLE)]
    with pytest.raises(_PickedError) as picked:
        main([*argv, "--pick-bundle", str(copy)])
    assert picked.value.args[0] is loaded[str(copy)] is not loaded[str(DEMO_BUNDLE)]
    with pytest.raises(_PickedError) as picked:
        main(argv)
    assert picked.value.args[0] is loaded[str(DEMO_BUNDLE)]

    def other_model(path: Path, *args: object, **kwargs: object) -> Guard:
        guard = recording_load(path)
        if path == copy:
            model = guard.manifest.model.model_copy(update={"weights_sha256": "0" * 64})
            monkeypatch.setattr(
                guard, "manifest", guard.manifest.model_copy(update={"model": model})
            )
        return guard

    monkeypatch.setattr(Guard, "load", other_model)
    with pytest.raises(SystemExit):
        main([*argv, "--pick-bundle", str(copy)])


def _run(row: int, queries: int, detection: int | None, screened: bool = True) -> ImageCheck:
    return ImageCheck(row, None, False, queries, queries - 9, False, "cap", screened, detection)


def test_compared_checks_agree_image_by_image_on_every_field(tmp_path: Path) -> None:
    """Over the images both attacked: an image agrees when every compared field does (the first
    detection only where both checks saw the detections); each other image is listed with the
    fields that differ. It goes into the results file and its table; running one of its checks
    again drops it."""
    alike = {"bundle_manifest_sha256": "ab12"}
    http = summarise([_run(0, 2500, 9), _run(1, 2500, 12), _run(2, 2400, 8)]) | alike
    in_process = (
        summarise([_run(0, 2500, 9), _run(1, 2500, 11), _run(2, 2500, 8), _run(3, 2500, 7)]) | alike
    )
    results = {"checks": {"boundary/refuse": http, "boundary/refuse/in_process": in_process}}
    (tmp_path / "policy_check.json").write_text(json.dumps(results))
    keys = list(results["checks"])
    assert main(["--compare", *keys, "--results", str(tmp_path)]) == 0
    compared = json.loads((tmp_path / "policy_check.json").read_text())["compared"]
    result = compared[" vs ".join(keys)]
    assert (result["images"], result["agree"], result["detections_compared"]) == (3, 1, 3)
    assert result["differing"] == [
        {"row": 1, "first_detection": [12, 11]},
        {"row": 2, "live_queries": [2400, 2500], "answers_withheld": [2391, 2491]},
    ]
    text = (tmp_path / "policy_check.md").read_text()
    assert "## Checks compared image by image" in text
    assert (
        "| boundary | refuse | HTTP + Redis vs in process | 3 | 1 | 3 | 1: first_detection 12 / "
        "11; 2: live_queries 2400 / 2500, answers_withheld 2391 / 2491 |" in text
    )
    unseen = summarise([_run(1, 2500, None, screened=False)]) | alike  # silent over HTTP
    assert compare({"checks": {keys[0]: unseen, keys[1]: in_process}}, keys) | {"checks": None} == {
        "checks": None,
        "images": 1,
        "agree": 1,
        "detections_compared": 0,
        "differing": [],
    }
    record(tmp_path, keys[0], http)  # one of its checks again: the comparison goes
    assert json.loads((tmp_path / "policy_check.json").read_text())["compared"] == {}


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (("boundary/refuse/in_process", {"bundle_manifest_sha256": "cd34"}), "bundle"),
        (("square/refuse/in_process", {}), "attack and policy"),
        (("boundary/silent/in_process", {}), "attack and policy"),
        (("boundary/refuse/in_process_from9", {"rows": range(9, 11)}), "no image in common"),
        (("boundary/refuse/in_process_from2", {"missing": True}), "not recorded"),
    ],
)
def test_comparing_refuses_checks_of_different_things(
    second: tuple[str, dict[str, object]], message: str
) -> None:
    key, fields = second
    rows = fields.pop("rows", range(0, 2))
    missing = fields.pop("missing", False)
    checks = {
        "boundary/refuse": _screened_check(range(0, 2), [4, 12]),
        key: _screened_check(rows, [4, 12], **fields),  # type: ignore[arg-type]
    }
    if missing:
        checks.pop(key)
    with pytest.raises(ValueError, match=message):
        compare({"checks": checks}, ["boundary/refuse", key])
