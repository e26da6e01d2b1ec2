"""Fuzzing the upload path and the OpenAPI surface against the app in process (lifespan started).

Hypothesis generates hostile uploads: random bytes; valid JPEG/PNG/GIF/WebP/BMP/TIFF files that
are truncated, bit-flipped or declare huge dimensions in their headers; wrong content types;
several files; empty fields; raw multipart bodies. Schemathesis generates requests from the
service's own OpenAPI schema. The property everywhere: no 5xx, a JSON body without a stack trace,
and the service still classifies a good image afterwards. The number of inputs tried is printed at
the end of the module and written to ``<pytest basetemp>/fuzz_counts.json``.

``ADVGUARD_FUZZ_EXAMPLES`` (default 250) sets the examples per property, so CI stays bounded.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.service.main import create_app
from app.service.settings import Settings
from tests.service.helpers import admin_of

EXAMPLES = int(os.environ.get("ADVGUARD_FUZZ_EXAMPLES", "250"))
LIMIT = 200_000
ADMIN_TOKEN = "fuzz-admin-token"
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
CONTENT_TYPES = (
    "image/png",
    "image/jpeg",
    "application/octet-stream",
    "text/plain",
    "application/json",
    "application/x-msdownload",
    "multipart/form-data",
    "",
    "image/svg+xml",
    "../../etc/passwd",
)
LEAKS = ("Traceback", 'File "', " object at 0x", "site-packages", "/work/")

TRIED: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fuzz_app() -> Iterator[tuple[FastAPI, TestClient]]:
    app = create_app(
        Settings(
            device="cpu",
            max_upload_bytes=LIMIT,
            max_pixels=4_000_000,
            max_wait_ms=1.0,
            admin_token=ADMIN_TOKEN,
        )
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client


@pytest.fixture(scope="module")
def client(fuzz_app: tuple[FastAPI, TestClient]) -> TestClient:
    return fuzz_app[1]


@pytest.fixture(scope="module", autouse=True)
def report_counts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    yield
    total = sum(TRIED.values())
    server_errors = sum(count for status, count in STATUSES.items() if status >= 500)
    summary = {
        "inputs_tried": total,
        "by_property": dict(TRIED),
        "statuses": {str(k): v for k, v in sorted(STATUSES.items())},
        "server_errors": server_errors,
        "examples_per_property": EXAMPLES,
    }
    path = tmp_path_factory.getbasetemp() / "fuzz_counts.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    line = (
        f"fuzz: {total} inputs tried, {server_errors} 5xx, statuses {summary['statuses']} ({path})"
    )
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{line}")
    else:
        print(line)


# --------------------------------------------------------------------------- checks


def check_response(response: Any, kind: str) -> None:
    TRIED[kind] += 1
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, (response.status_code, response.text[:500])
    for leak in LEAKS:
        assert leak not in response.text, response.text[:500]
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
    else:
        raise AssertionError(f"not JSON: {response.headers.get('content-type')}")
    if response.status_code == 200:
        assert body["decision"] in ("accepted", "rejected")
        assert body["score"] is None and body["threshold"] is None
    else:
        assert body["error"] and body["message"] and body["request_id"]


def still_serving(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    response = client.post("/classify", files={"file": ("ok.png", _encode(_image(7, 32, 32)))})
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- image crafting


def _image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + payload))
    return struct.pack(">I", len(payload)) + kind + payload + crc


def huge_dimensions(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """Rewrite the declared size in the header (checksums fixed where the format has them)."""
    out = bytearray(data)
    if fmt == "PNG":  # IHDR is the first chunk, with a CRC
        ihdr = struct.pack(">II", width, height) + bytes(out[24:29])
        return bytes(out[:8]) + _png_chunk(b"IHDR", ihdr) + bytes(out[33:])
    if fmt == "GIF":  # logical screen and first image descriptor, 16-bit little-endian
        w, h = min(width, 0xFFFF), min(height, 0xFFFF)
        out[6:10] = struct.pack("<HH", w, h)
        descriptor = out.find(b"\x2c", 13)
        if descriptor > 0:
            out[descriptor + 5 : descriptor + 9] = struct.pack("<HH", w, h)
        return bytes(out)
    if fmt == "BMP":  # BITMAPINFOHEADER: signed 32-bit width and height
        out[18:26] = struct.pack("<ii", min(width, 2**31 - 1), min(height, 2**31 - 1))
        return bytes(out)
    if fmt == "JPEG":  # every SOFn: precision, height, width (16-bit big-endian)
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
            at = out.find(marker)
            if at >= 0:
                out[at + 5 : at + 9] = struct.pack(">HH", min(height, 0xFFFF), min(width, 0xFFFF))
        return bytes(out)
    if fmt == "WEBP":  # lossy VP8 frame header after the start code: 14-bit sizes
        at = out.find(b"\x9d\x01\x2a")
        if at >= 0:
            out[at + 3 : at + 7] = struct.pack("<HH", min(width, 0x3FFF), min(height, 0x3FFF))
        return bytes(out)
    if fmt == "TIFF":  # ImageWidth (256) and ImageLength (257) in the first IFD
        order = "<" if out[:2] == b"II" else ">"
        (ifd,) = struct.unpack(order + "I", out[4:8])
        (entries,) = struct.unpack(order + "H", out[ifd : ifd + 2])
        for i in range(entries):
            at = ifd + 2 + 12 * i
            tag, kind = struct.unpack(order + "HH", out[at : at + 4])
            if tag in (256, 257):
                value = width if tag == 256 else height
                if kind == 3:  # SHORT
                    out[at + 8 : at + 12] = struct.pack(order + "HH", min(value, 0xFFFF), 0)
                else:
                    out[at + 8 : at + 12] = struct.pack(order + "I", min(value, 2**32 - 1))
        return bytes(out)
    raise ValueError(fmt)


@st.composite
def image_files(draw: st.DrawFn) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(FORMATS))
    width = draw(st.integers(1, 48))
    height = draw(st.integers(1, 48))
    data = _encode(_image(draw(st.integers(0, 2**16)), width, height), fmt)
    mutation = draw(st.sampled_from(("none", "truncate", "flip", "huge", "huge_truncate")))
    if mutation in ("huge", "huge_truncate"):
        side = st.integers(2_001, 2**31 - 1)
        data = huge_dimensions(data, fmt, draw(side), draw(side))
    if mutation in ("truncate", "huge_truncate"):
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if mutation == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 16))):
            position = draw(st.integers(0, len(out) - 1))
            out[position] ^= 1 << draw(st.integers(0, 7))
        data = bytes(out)
    return f"{fmt}-{mutation}", data


filenames = st.one_of(st.just("image"), st.text(min_size=0, max_size=40))


# --------------------------------------------------------------------------- properties


@FUZZ
@given(data=st.binary(min_size=0, max_size=4096), content_type=st.sampled_from(CONTENT_TYPES))
def test_random_bytes(client: TestClient, data: bytes, content_type: str) -> None:
    response = client.post("/classify", files={"file": ("x", data, content_type)})
    check_response(response, "random_bytes")


@FUZZ
@given(
    case=image_files(),
    filename=filenames,
    content_type=st.sampled_from(CONTENT_TYPES),
)
def test_mutated_images(
    client: TestClient, case: tuple[str, bytes], filename: str, content_type: str
) -> None:
    kind, data = case
    response = client.post("/classify", files={"file": (filename, data, content_type)})
    check_response(response, "mutated_images")
    if kind.endswith("-huge") and filename:
        # a huge declared size is refused by the pixel limit, or the header is unreadable (a
        # part with an empty filename is a plain form field, not a file: 422)
        assert response.status_code == 400, (kind, response.text)


@FUZZ
@given(
    parts=st.lists(
        st.tuples(
            st.sampled_from(("file", "file", "other", "", "FILE", "file[]")),
            st.one_of(st.binary(max_size=512), image_files().map(lambda case: case[1])),
            st.sampled_from(CONTENT_TYPES),
            st.booleans(),  # as a file part (filename) or as a plain form field
        ),
        min_size=0,
        max_size=4,
    ),
)
def test_multipart_shapes(client: TestClient, parts: list[tuple[str, bytes, str, bool]]) -> None:
    """Several files, empty fields, fields that are not files, no field at all."""
    files = [(name, ("f.bin", data, ctype)) for name, data, ctype, as_file in parts if as_file]
    fields = [(name, data.decode("latin-1")) for name, data, _, as_file in parts if not as_file]
    if files:
        response = client.post("/classify", files=files, data=dict(fields))
    elif fields:
        response = client.post("/classify", data=dict(fields))
    else:
        response = client.post("/classify")
    check_response(response, "multipart_shapes")


_BOUNDARY = "fuzzb0undary"
raw_piece = st.sampled_from(
    (
        f"--{_BOUNDARY}\r\n",
        f"--{_BOUNDARY}--\r\n",
        'Content-Disposition: form-data; name="file"; filename="a.png"\r\n',
        'Content-Disposition: form-data; name="file"\r\n',
        "Content-Disposition: form-data\r\n",
        "Content-Disposition: attachment; filename*=UTF-8''%ff%fe\r\n",
        "Content-Type: image/png\r\n",
        "Content-Transfer-Encoding: base64\r\n",
        "\r\n",
        "\r\n\r\n",
        "--",
    )
).map(str.encode)


@FUZZ
@given(
    pieces=st.lists(st.one_of(raw_piece, st.binary(max_size=64)), max_size=12),
    content_type=st.sampled_from(
        (
            f"multipart/form-data; boundary={_BOUNDARY}",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            f"multipart/form-data; boundary={'x' * 300}",
            "application/x-www-form-urlencoded",
            "application/json",
            "text/plain; charset=utf-7",
            "image/png",
        )
    ),
)
def test_raw_bodies(client: TestClient, pieces: list[bytes], content_type: str) -> None:
    """Malformed multipart framing and bodies that are not multipart at all."""
    body = b"".join(pieces)
    response = client.post("/classify", content=body, headers={"Content-Type": content_type})
    check_response(response, "raw_bodies")


def test_still_serving_after_fuzzing(client: TestClient) -> None:
    still_serving(client)
    metrics = admin_of(client).get("/metrics").text
    assert 'advguard_http_responses_total{status="500"}' not in metrics


# --------------------------------------------------------------------------- schemathesis


def _schema(app: FastAPI) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def schema_app(fuzz_app: tuple[FastAPI, TestClient]) -> FastAPI:
    # the TestClient context keeps the lifespan (model, batcher) running for schemathesis' calls
    return fuzz_app[0]


def test_schemathesis(schema_app: FastAPI, client: TestClient) -> None:
    """Every operation of the OpenAPI schema with generated inputs: no 5xx, responses conform."""
    from hypothesis import given as hgiven
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    # both listeners: the public app and the admin app (app.service.admin), which shares its state
    public = [result.ok() for result in _schema(schema_app).get_all_operations()]
    admin_app = schema_app.state.admin_app
    private = [result.ok() for result in _schema(admin_app).get_all_operations()]
    assert {op.path for op in public} >= {
        "/classify",
        "/readyz",
        "/v1/client",
        "/v1/neighbours/{row}",
    }
    assert {op.path for op in private} >= {"/clients/{client_id}", "/clients", "/readyz"}
    assert not {op.path for op in public} & {"/clients/{client_id}", "/clients"}
    operations = public + private
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    for operation in operations:

        @FUZZ
        @hgiven(case=operation.as_strategy())
        def run(case: Any) -> None:
            # admin operations are called both with the admin token and without it
            admin = case.operation.path.startswith("/clients")
            for headers in ({"X-Admin-Token": ADMIN_TOKEN}, None) if admin else (None,):
                response = case.call(headers=headers)
                TRIED["schemathesis"] += 1
                STATUSES[response.status_code] += 1
                case.validate_response(response, checks=checks)
                for leak in LEAKS:
                    assert leak not in response.text
                if headers is None and admin:
                    assert response.status_code == 401

        run()
    still_serving(client)
