"""Evidence for trusted callers only: ``POST /classify?explain=true``, ``GET /v1/client``,
``GET /v1/neighbours/{row}``, ``GET /v1/demo/session`` and the page at ``/``.

Untrusted callers who ask for the evidence get their verdict with the evidence silently omitted
(``explanation: null``): asking is not an error, and the answer says nothing about why. Their
flag state and the neighbour images are refused with 403 ``not_trusted``."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.errors import AdvguardError
from app.core.guard import Guard
from app.service.main import create_app
from app.service.settings import DEFAULT_BUNDLE, Settings
from tests.service.helpers import CIFAR_TAR, LabelledImage, fgsm, upload

TOKEN = "explain-admin-token"
TRUSTED = {"X-Admin-Token": TOKEN}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(
        device="cpu", admin_token=TOKEN, neighbour_source=CIFAR_TAR, max_wait_ms=1.0
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _explain(client: TestClient, data: bytes, headers: dict[str, str] | None = None) -> Any:
    response = client.post(
        "/classify?explain=true", files={"file": ("x.png", data)}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_untrusted_callers_get_the_verdict_without_evidence(
    client: TestClient, test_images: list[LabelledImage]
) -> None:
    for headers in (None, {"X-Admin-Token": "wrong"}, {"X-Admin-Token": ""}):
        body = _explain(client, test_images[0].data, headers)
        assert body["decision"] in ("accepted", "rejected")
        assert body["explanation"] is None and body["score"] is None
    assert upload(client, test_images[0].data).json()["explanation"] is None  # not asked


def test_trusted_evidence_is_the_decision_s_own(
    client: TestClient, guard: Guard, test_images: list[LabelledImage]
) -> None:
    """Score, threshold, statistics and p-values are those the decision used; the histogram
    counts the vote's k neighbours; the nearest are the vote index's 8 nearest rows."""
    adversarial = fgsm(guard, test_images[:4])
    for data in [image.data for image in test_images[:4]] + adversarial:
        body = _explain(client, data, TRUSTED)
        ex = body["explanation"]
        verdict = guard.classify_images([Image.open(io.BytesIO(data)).convert("RGB")])[0]
        assert ex["score"] == pytest.approx(verdict.score, rel=1e-6)
        assert ex["threshold"] == guard.threshold
        assert ex["predicted_class"] == verdict.predicted_class
        assert ex["predicted_class_name"] == verdict.class_name
        assert (ex["score"] >= ex["threshold"]) == (body["decision"] == "accepted")
        assert [s["name"] for s in ex["statistics"]] == guard.detector.names
        assert all(0 < s["p_value"] <= 1 for s in ex["statistics"])
        assert ex["combination"] == "hmp" and ex["vote_statistic"] == "vote@layer3.2"
        assert len(ex["vote_histogram"]) == 10
        assert sum(ex["vote_histogram"]) == guard.manifest.detector.k
        nearest = ex["nearest"]
        assert len(nearest) == 8 and ex["neighbour_images"] is True
        distances = [n["squared_distance"] for n in nearest]
        assert distances == sorted(distances)
        labels = np.load(DEFAULT_BUNDLE / "labels.npy")
        for n in nearest:
            assert n["label"] == labels[n["id"]]
            assert n["class_name"] == guard.class_names[n["label"]]
        if body["decision"] == "rejected":
            assert body["prediction"] is None  # the label stays withheld, evidence or not


def test_the_docs_name_the_demo_bundle_s_statistics(guard: Guard) -> None:
    """docs/service.md's table of the explanation's fields lists the demo bundle's statistics by
    name: a new default bundle must not leave it naming the old one's."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "service.md"
    lines = docs.read_text().splitlines()
    row = next(line for line in lines if line.startswith("| `statistics` |"))
    listed = re.findall(r"`([a-z_0-9]+@[a-z0-9_.]+)`", row.split("for the demo bundle")[0])
    assert listed == guard.detector.names


def test_expose_scores_trusts_every_caller(test_images: list[LabelledImage]) -> None:
    with TestClient(create_app(Settings(device="cpu", expose_scores=True))) as client:
        body = _explain(client, test_images[1].data)
        assert body["explanation"]["score"] == pytest.approx(body["score"])
        assert body["explanation"]["neighbour_images"] is False
        assert client.get("/v1/demo/session").json()["trusted"] is True
        refused = client.get("/v1/neighbours/0")
        assert refused.status_code == 404 and refused.json()["error"] == "no_neighbour_source"


def test_own_flag_state_for_trusted_callers_only(
    client: TestClient, test_images: list[LabelledImage]
) -> None:
    me = {"X-Client-ID": "explain-me"}
    refused = client.get("/v1/client", headers=me)
    assert refused.status_code == 403 and refused.json()["error"] == "not_trusted"
    fresh = client.get("/v1/client", headers={**me, **TRUSTED}).json()
    assert fresh == {"client_id": "explain-me", "known": False, "stats": None}
    upload(client, test_images[2].data, me)
    state = client.get("/v1/client", headers={**me, **TRUSTED}).json()
    assert state["known"] and state["stats"]["requests"] == 1
    assert state["stats"]["flagged"] is False
    session = client.get("/v1/demo/session", headers=me).json()
    assert session == {"client_id": "explain-me", "trusted": False, "neighbour_images": True}
    assert client.get("/v1/demo/session", headers={**me, **TRUSTED}).json()["trusted"] is True


def test_neighbour_thumbnails(client: TestClient) -> None:
    references = json.loads((DEFAULT_BUNDLE / "sources.json").read_text())
    assert client.get("/v1/neighbours/0").status_code == 403
    response = client.get("/v1/neighbours/0", headers=TRUSTED)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with tarfile.open(CIFAR_TAR) as archive:
        handle = archive.extractfile(references[0])
        assert handle is not None
        original = np.asarray(Image.open(handle).convert("RGB"))
    served = np.asarray(Image.open(io.BytesIO(response.content)))
    np.testing.assert_array_equal(served, original)  # 32 px: served as it is, losslessly
    for bad in ("45000", "-1"):
        missing = client.get(f"/v1/neighbours/{bad}", headers=TRUSTED)
        assert missing.status_code == 404 and missing.json()["error"] == "unknown_neighbour"
    assert client.get("/v1/neighbours/x", headers=TRUSTED).status_code == 422


def test_the_page_and_its_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path in ("/static/demo.js", "/static/demo.css", "/static/examples/examples.json"):
        assert client.get(path).status_code == 200, path
    for url in ("http://", "https://", "//cdn"):  # offline: nothing from elsewhere
        assert url not in page.text and url not in client.get("/static/demo.js").text
    examples = client.get("/static/examples/examples.json").json()["examples"]
    assert {e["kind"] for e in examples} == {"authentic", "fgsm", "pgd"}
    for example in examples:
        assert client.get(f"/static/examples/{example['file']}").status_code == 200


def test_neighbour_source_needs_a_bundle_with_source_references(tmp_path: Any) -> None:
    """A bundle built before sources.json cannot show neighbours: refused at start, clearly."""
    import shutil

    from tests.index_builder.test_source_references import FORMAT1

    bundle = tmp_path / "old"
    shutil.copytree(FORMAT1 / "single", bundle)
    shutil.copyfile(FORMAT1 / "model.pth", bundle / "model.pth")
    app = create_app(Settings(device="cpu", bundle=bundle, neighbour_source=CIFAR_TAR))
    with pytest.raises(AdvguardError, match="records no source references"), TestClient(app):
        pass
    missing = create_app(Settings(device="cpu", neighbour_source=tmp_path / "nowhere.tar"))
    with pytest.raises(AdvguardError, match="not found"), TestClient(missing):
        pass


def test_neighbour_errors_name_no_path_and_no_python_object(tmp_path: Path) -> None:
    """They named the server's source path and a BytesIO repr (a review)."""
    from app.service.neighbours import NeighbourImages, NeighbourNotFoundError

    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "bad.jpg").write_bytes(b"not an image")
    images = NeighbourImages(tmp_path, ["cls/missing.jpg", "cls/bad.jpg"])
    for row in (0, 1):
        with pytest.raises(NeighbourNotFoundError) as refused:
            images.thumbnail(row)
        message = str(refused.value)
        assert message.startswith(f"row {row}: ")
        assert str(tmp_path) not in message and "object at" not in message
