"""``explorer serve``: local by default, foreign Host headers refused, a busy port named, dataset paths.

Traffic goes only to this machine's own addresses: 127.0.0.1 and the addresses
``hostname -I`` lists for it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from explorer._types import InputError
from explorer.app.server import _relative_name, allowed_hosts

EXE = shutil.which("explorer", path=str(Path(sys.executable).parent))
#: a page build takes ~4 s on a busy 2-core machine; the server's start (imports, sample) more
_START_DEADLINE_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_addresses() -> list[str]:
    """This machine's non-loopback addresses (``hostname -I``, else its host name's)."""
    found: set[str] = set()
    tool = shutil.which("hostname")
    if tool:
        out = subprocess.run([tool, "-I"], capture_output=True, text=True, check=False, timeout=10).stdout
        found.update(out.split())
    try:
        found.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return sorted(a for a in found if not a.startswith(("127.", "::1")) and "%" not in a)


def _get(host: str, port: int, *, host_header: str | None = None, timeout: float = 60) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest("GET", "/", skip_host=host_header is not None)
        if host_header is not None:
            conn.putheader("Host", host_header)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as the kernel lists them) of sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


@contextlib.contextmanager
def _serving(folder: Path, *options: str):
    """Run ``explorer serve`` (the bundled sample) until it answers; yield its port."""
    port = _free_port()
    log_path = folder.parent / f"serve_{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(  # noqa: S603 - our own console script
            [EXE, "serve", "--port", str(port), "--data-dir", str(folder), *options],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + _START_DEADLINE_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"explorer serve exited with {proc.returncode}: {log_path.read_text()}")
                try:
                    _get("127.0.0.1", port, timeout=60)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"explorer serve did not answer within {_START_DEADLINE_S} s")
                    time.sleep(0.5)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``explorer serve`` with the default address, as a user starts it."""
    with _serving(tmp_path_factory.mktemp("serve_data")) as port:
        yield port


def test_serves_localhost_only_by_default(served):
    assert _get("127.0.0.1", served) == 200
    # every listening socket is on the loopback interface (127.0.0.1 is 0100007F in the table)
    listening = _listening(served)
    assert listening, "no listening socket found for the server's port"
    assert all(a in ("0100007F", "00000000000000000000000001000000") for a in listening), listening
    for address in _own_addresses():
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            with pytest.raises(ConnectionRefusedError):
                s.connect((address, served))


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "192.0.2.66"])
def test_foreign_host_header_is_refused(served, host):
    """DNS rebinding: a page on another site reaches 127.0.0.1 with its own host name."""
    assert _get("127.0.0.1", served, host_header=f"{host}") == 403


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "LOCALHOST"])
def test_local_host_headers_are_answered(served, host):
    assert _get("127.0.0.1", served, host_header=f"{host}:{served}") == 200


def test_port_in_use_is_a_message(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run(  # noqa: S603
            [EXE, "serve", "--port", str(port), "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert proc.returncode == 2, proc.stderr
    for text in (f"Port {port}", "already in use", "--port 0"):
        assert text in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    # refused before the dataset is loaded or Panel imported (seconds, not the server's start)
    assert time.monotonic() - start < 20


def test_allowed_hosts():
    assert allowed_hosts(None, None) == {"localhost", "127.0.0.1", "[::1]", "::1"}
    hosts = allowed_hosts("0.0.0.0", ["lab.example.org:5006", "10.1.2.3"])  # noqa: S104
    assert {"lab.example.org", "10.1.2.3", "localhost"} <= hosts
    assert "0.0.0.0" not in hosts  # noqa: S104
    assert allowed_hosts("10.1.2.3", None) >= {"10.1.2.3"}
    assert allowed_hosts("0.0.0.0", ["*"]) is None  # noqa: S104


def test_dataset_path_however_written(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "runs").mkdir(parents=True)
    (data / "x.h5ad").write_bytes(b"")
    (data / "runs" / "y.h5ad").write_bytes(b"")
    (tmp_path / "outside.h5ad").write_bytes(b"")
    folder = data.resolve()
    monkeypatch.chdir(tmp_path)
    # relative to the current folder, relative to the data directory, absolute, with ./
    assert _relative_name("data/x.h5ad", folder) == "x.h5ad"
    assert _relative_name("./data/runs/y.h5ad", folder) == "runs/y.h5ad"
    assert _relative_name("x.h5ad", folder) == "x.h5ad"
    assert _relative_name("runs/y.h5ad", folder) == "runs/y.h5ad"
    assert _relative_name(str(data / "x.h5ad"), folder) == "x.h5ad"
    monkeypatch.chdir(data / "runs")
    assert _relative_name("y.h5ad", folder) == "runs/y.h5ad"
    assert _relative_name("../x.h5ad", folder) == "x.h5ad"
    with pytest.raises(InputError, match="outside the data directory"):
        _relative_name(str(tmp_path / "outside.h5ad"), folder)
    with pytest.raises(InputError, match="outside the data directory"):
        _relative_name("../../outside.h5ad", folder)


def test_serve_cli_accepts_cwd_relative_path(tmp_path, monkeypatch, capsys):
    """`explorer serve data/x.h5ad --data-dir data` finds the file and reads it (here: not HDF5)."""
    from explorer.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.h5ad").write_text("not a dataset")
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "data/x.h5ad", "--data-dir", "data", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "'x.h5ad' is not an AnnData (.h5ad) file" in err, err
    assert "does not exist" not in err
    assert "No file" not in err


def test_allow_websocket_origin_opens_the_host_check(tmp_path):
    """Opening up is deliberate: the named host is answered, any other still refused."""
    with _serving(tmp_path, "--address", "127.0.0.1", "--allow-websocket-origin", "lab.example.org") as port:
        assert _get("127.0.0.1", port, host_header=f"lab.example.org:{port}") == 200
        assert _get("127.0.0.1", port, host_header=f"evil.example:{port}") == 403


def _processes_with(*args: str) -> list[int]:
    """Pids of processes whose command line contains ``args`` in a row."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in cmd]
        if any(words[i : i + len(args)] == list(args) for i in range(len(words))):
            found.append(int(entry.name))
    return found


def test_num_procs_forks_workers_that_keep_the_host_check(tmp_path):
    """``--num-procs 2``: two workers under one supervisor, each answering and refusing foreign hosts."""
    with _serving(tmp_path, "--num-procs", "2") as port:
        assert len(_processes_with("--port", str(port))) == 3  # the supervisor and two workers
        for _ in range(4):
            assert _get("127.0.0.1", port) == 200
            assert _get("127.0.0.1", port, host_header=f"evil.example:{port}") == 403
    # stopping the supervisor (SIGTERM, as a service manager does) stops its workers too
    deadline = time.monotonic() + 30
    while _processes_with("--port", str(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with("--port", str(port)) == []


@pytest.mark.parametrize("value", ["-1", "two"])
def test_bad_num_procs_is_a_message(tmp_path, value):
    proc = subprocess.run(  # noqa: S603
        [EXE, "serve", "--num-procs", value, "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--num-procs" in proc.stderr
    assert "Traceback" not in proc.stderr
