"""``advguard serve`` as a real uvicorn process on a loopback port: same verdicts as
``advguard classify``, streaming uploads refused early, graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.helpers import advguard_serve
from tests.service.helpers import LabelledImage, free_port

ADVGUARD = str(Path(sys.executable).parent / "advguard")
N_IMAGES = 60


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {"ADVGUARD_EXPOSE_SCORES": "true", "ADVGUARD_MAX_UPLOAD_BYTES": "100000"}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with advguard_serve(port, log, env, "--log-level", "warning") as process:
        yield f"http://127.0.0.1:{port}", process


def test_same_verdicts_as_classify_cli(
    server: tuple[str, subprocess.Popen[bytes]],
    test_images: list[LabelledImage],
    tmp_path: Path,
) -> None:
    base, _ = server
    images = test_images[:N_IMAGES]
    paths = []
    for image in images:
        path = tmp_path / image.name
        path.write_bytes(image.data)
        paths.append(path)
    cli = subprocess.run(
        [ADVGUARD, "classify", "--device", "cpu", *map(str, paths)],
        capture_output=True,
        check=True,
        text=True,
    )
    expected = {Path(v["file"]).name: v for v in map(json.loads, cli.stdout.splitlines())}
    assert len(expected) == N_IMAGES
    with httpx.Client(base_url=base, timeout=30) as client:
        for image in images:
            response = client.post("/classify", files={"file": (image.name, image.data)})
            assert response.status_code == 200
            body, want = response.json(), expected[image.name]
            assert body["decision"] == ("accepted" if want["accepted"] else "rejected")
            assert body["score"] == pytest.approx(want["score"], abs=1e-5)
            assert body["threshold"] == pytest.approx(want["threshold"])
            if want["accepted"]:
                assert body["prediction"]["class_index"] == want["predicted_class"]
                assert body["prediction"]["class_name"] == want["class_name"]
                assert body["prediction"]["probability"] == pytest.approx(
                    want["probability"], abs=1e-5
                )


def test_streaming_upload_refused_before_it_ends(
    server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """A chunked upload with no Content-Length is cut off soon after the byte limit."""
    base, _ = server
    host, port = base.removeprefix("http://").split(":")
    boundary = "b0undary"
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            (
                "POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
            ).encode()
        )
        part = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        ).encode()
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        chunk = b"\0" * 16384
        response = b""
        sock.settimeout(0.05)
        for _ in range(2000):  # up to 32 MB offered
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                response += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if response:
                break
        sock.settimeout(5)
        try:
            while b"\r\n\r\n" not in response:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        except OSError:
            pass
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 2_000_000  # limit 100 kB: refused long before the 32 MB were sent


def test_graceful_shutdown(server: tuple[str, subprocess.Popen[bytes]]) -> None:
    _, process = server
    process.send_signal(signal.SIGTERM)
    # uvicorn drains, runs the lifespan shutdown (the batcher drains), then re-raises SIGTERM
    assert process.wait(30) in (0, -signal.SIGTERM)
    output = process.stdout.read().decode() if process.stdout else ""
    assert "Traceback" not in output


def test_admin_port_must_differ_from_the_public_port(capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    assert main(["serve", "--port", "18765", "--admin-port", "18765", "--device", "cpu"]) == 2
    assert "the admin port is the public port" in capsys.readouterr().err


def test_a_misspelt_setting_refuses_the_start_and_names_the_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydantic-settings ignores unknown variables: a misspelt ADVGUARD_STATEFUL_POLICY would
    leave the policy at its default without a word. ``advguard serve`` refuses instead."""
    from app.cli import main

    monkeypatch.setenv("ADVGUARD_STATEFUL_POLCY", "silent")
    monkeypatch.setenv("advguard_torch_thread", "1")  # names are read case-insensitively
    monkeypatch.setenv("ADVGUARD_PORT", "8000")  # the image's own variable: no setting, no typo
    port = str(free_port())  # the admin port on it too: refused even if the names were not
    assert main(["serve", "--port", port, "--admin-port", port, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advguard serve: refusing to start: ")
    assert (
        "ADVGUARD_STATEFUL_POLCY is not a setting (did you mean ADVGUARD_STATEFUL_POLICY?)" in err
    )
    assert "advguard_torch_thread is not a setting (did you mean ADVGUARD_TORCH_THREADS?)" in err
    assert "ADVGUARD_PORT" not in err


def test_a_refused_start_exits_non_zero(tmp_path: Path) -> None:
    """A setting the lifespan refuses (here a neighbour source that is neither a directory nor
    a tar) ends the process with uvicorn's startup-failure code and says why."""
    port, admin = free_port(), free_port()
    (tmp_path / "notes.txt").write_text("not an archive")
    env = {**os.environ, "ADVGUARD_NEIGHBOUR_SOURCE": str(tmp_path / "notes.txt")}
    done = subprocess.run(
        [ADVGUARD, "serve", "--port", str(port), "--admin-port", str(admin), "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert "is not a directory or a tar" in done.stderr


def test_a_device_this_machine_lacks_is_refused_before_uvicorn_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It used to load in the lifespan: a 60-line driver traceback through uvicorn, exit 3."""
    from app.cli import main

    port = str(free_port())  # the admin port on it too: refused even if the device were not
    assert main(["serve", "--port", port, "--admin-port", port, "--device", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advguard serve: refusing to start: device 'bogus'"), err


def test_a_setting_that_is_not_json_is_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydantic-settings names the field ("api_keys") and its source, not the variable."""
    from app.cli import main

    monkeypatch.setenv("ADVGUARD_API_KEYS", "not json")
    port = str(free_port())  # the admin port on it too: refused even if the value were not
    assert main(["serve", "--port", port, "--admin-port", port, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advguard serve: refusing to start: ADVGUARD_API_KEYS cannot be parsed")
    assert "lists and mappings are JSON" in err


def test_a_busy_admin_port_refuses_the_start_instead_of_hanging(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """uvicorn reported the failed bind by ending the admin listener's task: the public one went
    on without it and the process hung, answering nothing (a review). Both are bound first."""
    from app.cli import main

    with socket.socket() as taken:  # as another advguard serve holds it: reusable, listening
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        port = free_port()
        code = main(["serve", "--port", str(port), "--admin-port", str(busy), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"advguard serve: refusing to start: cannot listen on 127.0.0.1:{busy}")
    assert "(the admin port)" in err
    with socket.socket() as again:  # the public port it had bound first is free again
        again.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"ADVGUARD_RETENTION": "0.5"}, "no calibrated threshold for retention 0.50"),
        ({"ADVGUARD_NEIGHBOUR_SOURCE": "/nowhere.tar"}, "/nowhere.tar does not exist"),
    ],
)
def test_settings_the_bundle_cannot_serve_are_refused_in_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    environment: dict[str, str],
    message: str,
) -> None:
    """They were refused only in the lifespan: a traceback through uvicorn, exit 3."""
    from app.cli import main

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    port, admin = str(free_port()), str(free_port())
    assert main(["serve", "--port", port, "--admin-port", admin, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advguard serve: refusing to start: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--port", "70000"], "expected a port from 1 to 65535, got 70000"),
        (["--admin-port", "0"], "expected a port from 1 to 65535, got 0"),
        (["--log-level", "foo"], "invalid choice: 'foo'"),
    ],
)
def test_serve_options_out_of_range_are_refused_by_argparse(
    capsys: pytest.CaptureFixture[str], option: list[str], message: str
) -> None:
    from app.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", *option])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_forwarded_for_is_read_only_from_trusted_proxies_and_every_line(tmp_path: Path) -> None:
    """uvicorn's own proxy headers trusted any loopback peer's X-Forwarded-For with
    ADVGUARD_TRUSTED_PROXIES unset (a review: '6.6.6.6' became the client); and with a trusted
    proxy only the first header line was read, so a client's forged line beat the proxy's."""
    import httpx

    from tests.deploy.helpers import advguard_serve

    port = free_port()
    with (
        advguard_serve(port, tmp_path / "a.log", {}),
        httpx.Client(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        forged = client.get("/v1/demo/session", headers={"X-Forwarded-For": "6.6.6.6"})
        assert forged.json()["client_id"] == "127.0.0.1"
    port = free_port()
    env = {"ADVGUARD_TRUSTED_PROXIES": '["127.0.0.1"]'}
    lines = [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "203.0.113.9")]
    with (
        advguard_serve(port, tmp_path / "b.log", env),
        httpx.Client(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        assert client.get("/v1/demo/session", headers=lines).json()["client_id"] == "203.0.113.9"


def test_a_refused_start_does_not_print_secrets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydantic's message quotes the raw settings: 22 of the stateful secret's 32 characters,
    a Redis URL's password and the start of API keys went to the logs (a review)."""
    from app.cli import main

    monkeypatch.setenv("ADVGUARD_ADMIN_TOKEN", "replace-me-but-not-yet")
    monkeypatch.setenv("ADVGUARD_STATEFUL_SECRET", "9f8e7d6c5b4a39281706f5e4d3c2b1a0")
    monkeypatch.setenv("ADVGUARD_API_KEYS", '{"a": "KEYabcdefghijklmnop"}')
    monkeypatch.setenv("ADVGUARD_REDIS_URL", "redis://:redispw@127.0.0.1:1")
    port, admin = str(free_port()), str(free_port())
    assert main(["serve", "--port", port, "--admin-port", admin, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "ADVGUARD_ADMIN_TOKEN still holds a placeholder" in err
    for secret in ("but-not-yet", "4a39281706", "KEYab", "redispw"):
        assert secret not in err, err


@pytest.mark.parametrize(("choice", "loop"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_the_service_answers_under_the_event_loop_chosen(
    choice: str, loop: str, tmp_path: Path, test_images: list[LabelledImage]
) -> None:
    """auto takes uvloop (installed with the project); asyncio's own loop stays a choice. A
    request is answered, and SIGTERM still drains and exits, under either."""
    port, log = free_port(), tmp_path / "serve.log"
    with advguard_serve(port, log, {"ADVGUARD_EVENT_LOOP": choice}) as process:
        image = test_images[0]
        answer = httpx.post(
            f"http://127.0.0.1:{port}/classify", files={"file": (image.name, image.data)}
        )
        assert answer.status_code == 200 and answer.json()["decision"] in ("accepted", "rejected")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) in (0, -signal.SIGTERM)
    output = log.read_text()
    assert f"event loop: {loop}" in output and "Traceback" not in output


def test_uvloop_asked_for_but_missing_refuses_and_auto_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from app.service.cli import _RefusedError, event_loop_factory

    assert event_loop_factory("uvloop")[0] == "uvloop"
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    with pytest.raises(_RefusedError, match="uvloop is not installed"):
        event_loop_factory("uvloop")
    name, factory = event_loop_factory("auto")
    assert name == "asyncio" and factory is asyncio.new_event_loop
