"""``bench.service_load``'s fill: the untimed queries that reach a screened service's store
before a benchmark's timed slices (a real ``advguard serve``, CIFAR-10 training photos)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import bench.service_load as service_load
from bench.common import admin_base, serve
from bench.load_service import test_jpegs as cifar_jpegs
from bench.service_load import Fill, fill_up, requests_of


def _screened(admin: str) -> float:
    """Queries the service's stateful detector has screened so far, by its metrics."""
    text = httpx.get(f"{admin}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "advguard_stateful_queries_total"
    )


def test_a_fill_sends_at_least_its_count_and_the_store_screens_every_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_load, "FILL_SLICE_S", 0.5)  # several loads for one fill
    photos = cifar_jpegs(120, split="train")
    fill = Fill(requests_of(photos, 10), 120, frozenset({"on"}))
    with serve({"ADVGUARD_SHED_DELAY_MS": "0"}) as (base, server):
        host, port = base.removeprefix("http://").rsplit(":", 1)
        admin = admin_base(server)
        before = _screened(admin)
        filled = asyncio.run(fill_up(host, int(port), int(admin.rsplit(":", 1)[1]), fill, 4))
        screened = _screened(admin) - before
    assert filled["sent"] >= 120
    assert filled["answered"] == filled["sent"]  # every fill query answered 200
    assert screened == filled["answered"]  # and each one screened (stored) by the detector
    assert filled["seconds"] > 0
