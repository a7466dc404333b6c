"""JupyterLab launcher, Makefile targets and Dockerfile: a token is always required, loopback is the default.

The server tests start the real JupyterLab through scripts/lab.sh on a free port, with every Jupyter
folder (config, data, runtime) inside the test's temporary folder so the user's own setup is untouched.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "scripts" / "lab.sh"
STARTUP_TIMEOUT_S = 60.0

pytest.importorskip("jupyterlab", reason="JupyterLab is part of the 'test' extra: pip install -e '.[test]'")
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")


# ------------------------------------------------------------------------------------------ helpers
def _isolated_env(root: Path) -> dict[str, str]:
    """The current environment without any LAB_*/JUPYTER* setting, with Jupyter's folders under `root`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAB_", "JUPYTER", "IPYTHON"))}
    for name in ("config", "data", "runtime", "ipython"):
        (root / name).mkdir(parents=True, exist_ok=True)
    env.update(
        JUPYTER_CONFIG_DIR=str(root / "config"),
        JUPYTER_DATA_DIR=str(root / "data"),
        JUPYTER_RUNTIME_DIR=str(root / "runtime"),
        IPYTHONDIR=str(root / "ipython"),
        JUPYTER_PLATFORM_DIRS="0",
        LAB_PYTHON=sys.executable,
    )
    return env


def _launch(args: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the launcher to completion (dry runs and refusals)."""
    return subprocess.run(["bash", str(LAUNCHER), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    """A TCP port that nothing listens on right now (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str | None = None, timeout: float = 5) -> tuple[int, bytes]:
    """HTTP GET; returns (status, body) for error statuses too instead of raising."""
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"token {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _listening_addresses(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the LISTEN sockets on `port`, read from /proc/net/tcp{,6} (Linux)."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            # The kernel prints each 32-bit word of the address in host (little-endian) byte order.
            raw = b"".join(bytes.fromhex(addr_hex[i:i + 8])[::-1] for i in range(0, len(addr_hex), 8))
            found.append(ipaddress.IPv6Address(raw) if v6 else ipaddress.IPv4Address(raw))
    return found


def _is_loopback(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, counting IPv4 loopback written as an IPv6-mapped address."""
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and anything it started: SIGTERM to its process group, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        proc.wait(timeout=15)


@dataclass(frozen=True)
class LabServer:
    """A running test server: where it answers, its token and folders."""

    base_url: str
    port: int
    token: str
    root: Path
    runtime_dir: Path
    log: Path


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """A real JupyterLab started by scripts/lab.sh with its default address and a known token."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    root.mkdir()
    (root / "probe.txt").write_text("hevisum\n")
    env = _isolated_env(tmp / "jupyter")
    port = _free_port()
    token = secrets.token_hex(24)
    log = tmp / "lab.log"
    args = ["--port", str(port), "--token", token, "--root", str(root)]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args += ["--", "--allow-root"]  # CI containers often run as root; Jupyter refuses root without it
    with open(log, "wb") as out:
        # Own session: the teardown can signal the server and its children as one group.
        proc = subprocess.Popen(
            ["bash", str(LAUNCHER), *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode} before answering:\n{log.read_text()}")
            try:
                status, _ = _get(f"{base}/api/status", token, timeout=2)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {STARTUP_TIMEOUT_S:.0f} s:\n{log.read_text()}")
            time.sleep(0.25)
        yield LabServer(base, port, token, root, Path(env["JUPYTER_RUNTIME_DIR"]), log)
    finally:
        _stop(proc)


# ------------------------------------------------------------------------------------------ the server
def test_requests_without_token_are_refused(lab_server: LabServer) -> None:
    for path in ("/api/contents", "/api/status", "/api/kernels"):
        status, _ = _get(lab_server.base_url + path)
        assert status in (401, 403), f"{path} without token answered {status}"
        status, _ = _get(lab_server.base_url + path, token="wrong-" + lab_server.token)
        assert status in (401, 403), f"{path} with a wrong token answered {status}"


def test_requests_with_token_succeed_and_show_the_root(lab_server: LabServer) -> None:
    status, body = _get(lab_server.base_url + "/api/contents", token=lab_server.token)
    assert status == 200
    listing = json.loads(body)
    assert listing["type"] == "directory"
    assert [item["name"] for item in listing["content"]] == ["probe.txt"]
    # The token in the URL (what the printed link uses) works as well as the header.
    status, body = _get(f"{lab_server.base_url}/api/contents/probe.txt?token={lab_server.token}")
    assert status == 200
    assert json.loads(body)["content"] == "hevisum\n"


def test_server_listens_on_loopback_only(lab_server: LabServer) -> None:
    infos = [json.loads(p.read_text()) for p in lab_server.runtime_dir.glob("jpserver-*.json")]
    assert len(infos) == 1
    assert infos[0]["port"] == lab_server.port
    assert infos[0]["hostname"] == "127.0.0.1"
    addresses = _listening_addresses(lab_server.port)
    if Path("/proc/net/tcp").exists():
        assert addresses, f"no listening socket found on port {lab_server.port}"
        assert all(_is_loopback(a) for a in addresses), addresses
    # From a non-loopback address of this machine, if it has one, the port is closed.
    try:
        others = {i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except socket.gaierror:
        others = set()
    for addr in sorted(a for a in others if not ipaddress.ip_address(a).is_loopback):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            assert s.connect_ex((addr, lab_server.port)) != 0, f"port {lab_server.port} open on {addr}"


def test_given_token_is_not_written_to_the_log(lab_server: LabServer) -> None:
    log = lab_server.log.read_text()
    assert f"http://127.0.0.1:{lab_server.port}/lab?token=<your token>" in log
    assert lab_server.token not in log


# ------------------------------------------------------------------------------------------ the launcher
def test_empty_token_is_refused(tmp_path: Path) -> None:
    for args in (["--token", ""], ["--token="]):
        started = time.monotonic()
        res = _launch([*args, "--port", str(_free_port())], _isolated_env(tmp_path))
        assert res.returncode == 2
        assert "empty token refused" in res.stderr
        assert "LAB_TOKEN" in res.stderr and "JUPYTER_TOKEN" in res.stderr  # says how to set one
        assert time.monotonic() - started < 10  # refused at once, no server started
        assert res.stdout == ""


def test_token_arguments_after_double_dash_are_refused(tmp_path: Path) -> None:
    res = _launch(["--dry-run", "--", "--IdentityProvider.token="], _isolated_env(tmp_path))
    assert res.returncode == 2
    assert "not allowed" in res.stderr


def test_missing_token_is_generated_random_and_printed(tmp_path: Path) -> None:
    env = _isolated_env(tmp_path)
    tokens = []
    for _ in range(2):
        res = _launch(["--dry-run"], env)
        assert res.returncode == 0, res.stderr
        match = re.search(r"http://127\.0\.0\.1:8888/lab\?token=([0-9a-f]+)$", res.stdout, re.MULTILINE)
        assert match, res.stdout
        tokens.append(match.group(1))
    assert len(tokens[0]) == 48 and tokens[0] != tokens[1]
    # An empty environment variable counts as "not set": a token is generated, nothing is refused.
    res = _launch(["--dry-run"], {**env, "LAB_TOKEN": "", "JUPYTER_TOKEN": ""})
    assert res.returncode == 0 and "generated token" in res.stdout


def test_defaults_and_token_kept_out_of_the_command_line(tmp_path: Path) -> None:
    env = {**_isolated_env(tmp_path), "JUPYTER_TOKEN": "t" * 40}
    res = _launch(["--dry-run"], env)
    assert res.returncode == 0, res.stderr
    cmd = shlex.split(res.stdout.split("would run: ", 1)[1])
    assert cmd[0] == "JUPYTER_TOKEN=..." and cmd[1:4] == [sys.executable, "-m", "jupyterlab"]
    for arg in ("--no-browser", "--ServerApp.ip=127.0.0.1", "--ServerApp.port=8888", "--ServerApp.port_retries=0"):
        assert arg in cmd
    assert "t" * 40 not in res.stdout + res.stderr
    assert "WARNING" not in res.stderr


def test_non_loopback_address_warns(tmp_path: Path) -> None:
    env = _isolated_env(tmp_path)
    for ip, warned in (("0.0.0.0", True), ("192.0.2.7", True), ("127.0.0.1", False), ("::1", False)):
        res = _launch(["--dry-run", "--ip", ip], env)
        assert res.returncode == 0, res.stderr
        assert ("WARNING" in res.stderr) is warned, (ip, res.stderr)
        if warned:
            assert "-p 127.0.0.1:8888:8888" in res.stderr


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    env = _isolated_env(tmp_path)
    for args, words in (
        (["--port", "http"], "port must be a number"),
        (["--port", "70000"], "port must be a number"),
        (["--ip", ""], "empty --ip"),
        (["--root", str(tmp_path / "missing")], "does not exist"),
        (["--bogus"], "unknown option"),
    ):
        res = _launch(["--dry-run", *args], env)
        assert res.returncode == 2 and words in res.stderr, (args, res.stderr)


# ------------------------------------------------------------------------------------------ the Makefile
def _make(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run make in the repository, output captured."""
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], env=env,
                          capture_output=True, text=True, timeout=60)


@needs_make
def test_make_help_lists_every_target(tmp_path: Path) -> None:
    res = _make(["help"], _isolated_env(tmp_path))
    assert res.returncode == 0
    listed = re.findall(r"^make (\w+)", res.stdout, re.MULTILINE)
    assert set(listed) >= {"run", "test", "init", "lab", "clean", "reset"}


@needs_make
def test_make_init_and_lab_recipes(tmp_path: Path) -> None:
    env = _isolated_env(tmp_path)
    venv = tmp_path / "venv"
    res = _make(["-n", "init", f"VENV={venv}"], env)
    assert res.returncode == 0, res.stderr
    assert '"torch==2.13.0"' in res.stdout
    assert 'pip install -q -e ".[test]"' in res.stdout and 'pip install -q -e ".[lab]"' in res.stdout
    assert 'ipykernel install --user --name "hevisum" --display-name "Python (.venv) hevisum"' in res.stdout
    res = _make(["-n", "lab", f"VENV={venv}", "LAB_TOKEN=s3cret-s3cret-s3cret"], env)
    assert res.returncode == 0, res.stderr
    assert f'LAB_PYTHON="{venv}/bin/python" bash scripts/lab.sh --' in res.stdout
    assert "s3cret" not in res.stdout  # the token reaches the launcher through the environment only


@needs_make
def test_make_clean_removes_venv_and_kernel_spec(tmp_path: Path) -> None:
    env = _isolated_env(tmp_path / "jupyter")
    # This venv has no jupyter of its own, so clean falls back to the one on PATH (the test's Python).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / ".hevisum-installed").touch()
    kernel = "hevisum-test-" + secrets.token_hex(4)
    spec = Path(env["JUPYTER_DATA_DIR"]) / "kernels" / kernel
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps(
        {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": kernel, "language": "python"}))
    res = _make(["clean", f"VENV={venv}", f"KERNEL_NAME={kernel}"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not venv.exists()
    assert not spec.exists()
    # A second clean has nothing left to do and still succeeds.
    res = _make(["clean", f"VENV={venv}", f"KERNEL_NAME={kernel}"], env)
    assert res.returncode == 0 and f"no Jupyter kernel spec '{kernel}'" in res.stdout


# ------------------------------------------------------------------------------------------ the Dockerfile
def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not pending):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _makefile_variable(name: str) -> str:
    """The default (`NAME ?= value`) the Makefile gives a variable."""
    match = re.search(rf"^{name}\s*\?=\s*(.*)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, f"{name} not set in the Makefile"
    return match.group(1).strip()


def test_dockerfile_runs_lab_as_non_root_with_a_token() -> None:
    instructions = _dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    start = max(i for i, k in enumerate(keywords) if k in ("CMD", "ENTRYPOINT"))
    users = [(i, a) for i, (k, a) in enumerate(instructions) if k == "USER" and i < start]
    assert users, "no USER before CMD/ENTRYPOINT: the server would run as root"
    assert users[-1][1].split(":")[0] not in ("root", "0")
    # Every install step runs as that user.
    first_user = users[0][0]
    assert all(i > first_user for i, (k, a) in enumerate(instructions) if k == "RUN" and a.startswith("make "))
    command = json.loads(instructions[start][1])
    assert command[-1].endswith(("scripts/lab.sh", "hevisum-lab"))
    copies = [a for k, a in instructions if k == "COPY" and "scripts/lab.sh" in a]
    if command[-1].endswith("hevisum-lab"):
        assert any(a.split()[-1] == command[-1] for a in copies), "the launcher is not copied where CMD runs it"
    text = (REPO / "Dockerfile").read_text()
    for bad in ("--allow-root", "token=''", 'token=""', "Token=''", "password=''", "disable_check_xsrf"):
        assert bad not in text, bad
    assert not re.search(r"\.token=(\s|$|\"\]|')", text), "an empty Jupyter token is set"
    env_lines = " ".join(a for k, a in instructions if k in ("ENV", "ARG"))
    assert "JUPYTER_TOKEN" not in env_lines, "a token baked into the image would be shared by every container"
    assert "LAB_IP=127.0.0.1" in env_lines
    assert ("EXPOSE", "8888") in instructions


def test_dockerfile_installs_with_the_makefile_and_cpu_torch() -> None:
    instructions = _dockerfile_instructions()
    runs = [a for k, a in instructions if k == "RUN"]
    assert _makefile_variable("TORCH_SPEC") == "torch==2.13.0"
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    assert args.get("TORCH_INDEX") == "https://download.pytorch.org/whl/cpu"  # CPU wheels unless asked
    make_runs = [r for r in runs if re.match(r"make (torch|init)\b", r)]
    assert [r.split()[1] for r in make_runs] == ["torch", "init"]
    for r in make_runs:
        assert 'TORCH_PIP_ARGS="--index-url ${TORCH_INDEX}"' in r
        assert "TORCH_SPEC" not in r  # the version comes from the Makefile alone
    # No other installer: what the image holds is what `make init` installs on a workstation.
    assert not any(re.search(r"\bpip3?\b|\buv\b|\bconda\b", r) for r in runs)


def test_dockerignore_keeps_venv_git_and_data_out() -> None:
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for needed in (".git", ".venv", "runs", "**/*.h5"):
        assert needed in patterns


@needs_make
def test_make_clean_refuses_a_folder_that_is_not_a_venv(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-venv"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    res = _make(["clean", f"VENV={folder}", "KERNEL_NAME=hevisum-test-none"], _isolated_env(tmp_path / "jupyter"))
    assert res.returncode != 0
    assert "not a virtual environment" in res.stdout + res.stderr
    assert (folder / "keep.txt").read_text() == "precious"
