"""Output folders and files: nothing of the user's is deleted, nothing is half-written, and interrupted or
concurrent commands leave a clear state. Real folders, real subprocesses and real signals throughout."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hevisum.demo import DemoSpec, write_demo
from hevisum.errors import HevisumError
from hevisum.io.atomic import MARKER, atomic_dir, check_output, lock_path, partial_path, read_marker

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"))

TINY_RUN_CONFIG = """
seed = 3
[models]
methods = []
[train]
num_workers = 0
"""

# A command that holds an output folder open: builds OUT.partial, then waits for a line on stdin. It goes
# through hevisum.cli.run_command, the same signal handling and error reporting as every `hevisum` command.
HOLDER = r"""
import sys
from hevisum.cli import run_command
from hevisum.io.atomic import atomic_dir

out, kind, mode = sys.argv[1], sys.argv[2], sys.argv[3]

def work():
    with atomic_dir(out, kind=kind, resume=mode == "resume") as tmp:
        seen = sorted(p.name for p in tmp.iterdir())
        (tmp / "result.txt").write_text("new; found " + ",".join(seen))
        print("ready", flush=True)
        if sys.stdin.readline().strip() == "fail":
            raise RuntimeError("failed midway")
    return 0

sys.exit(run_command(work))
"""


class Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def hevisum(capsys):
    """`hevisum ARGS` in this process (the real hevisum.cli.main); returns code, stdout and stderr."""
    from hevisum.cli import main

    def call(*args: str | Path) -> Ran:
        capsys.readouterr()
        rc = main([str(a) for a in args])
        got = capsys.readouterr()
        return Ran(rc, got.out, got.err)

    return call


def one_error_line(r, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (hidden ones too) with its bytes; None for folders."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def leftovers(parent: Path) -> list[str]:
    """Temporary things a command may leave beside its output: OUT.partial, OUT.lock, .NAME.*.tmp."""
    return sorted(p.name for p in parent.iterdir()
                  if p.name.endswith((".partial", ".lock", ".tmp")) or ".old-" in p.name)


def _default_signals() -> None:
    # a test runner started under nohup hands its children SIGHUP ignored, and hevisum keeps what the caller
    # ignores: the holder starts as from an interactive shell, with every signal at its default
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def start_holder(out: Path, kind: str = "run", mode: str = "fresh") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), kind, mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=_default_signals)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"holder did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc


def finish(proc: subprocess.Popen, say: str = "go") -> tuple[int, str]:
    _, err = proc.communicate(say + "\n", timeout=60)
    return proc.returncode, err


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@contextlib.contextmanager
def read_only(folder: Path):
    """Make ``folder`` unwritable: chmod for a normal user, the immutable flag for root (who ignores modes)."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    try:
        ok = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    except FileNotFoundError:
        ok = False
    if not ok:
        pytest.skip("running as root and cannot set the immutable flag (chattr +i): no read-only folder")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


def made_by_hevisum(out: Path, kind: str, files: dict[str, str]) -> Path:
    """A finished output folder of ``kind`` (written through atomic_dir, so with its marker)."""
    with atomic_dir(out, kind=kind) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A tiny demo dataset, alone in its folder data/."""
    data = tmp_path_factory.mktemp("inputs") / "data"
    h5, _ = write_demo(data / "d.h5", DemoSpec(n_train=2, n_test=1, n_spots=40, n_targets=4, seed=1),
                       progress=False)
    return h5


def takes_safety_kwargs() -> bool:
    from hevisum.pipeline import run_pipeline
    from hevisum.predict import predict_from_run

    return ("force" in inspect.signature(run_pipeline).parameters
            and "resume" in inspect.signature(run_pipeline).parameters
            and "force" in inspect.signature(predict_from_run).parameters)


needs_run_kwargs = pytest.mark.skipif(not takes_safety_kwargs(),
                                      reason="run_pipeline/predict_from_run do not take force/resume yet")


# --------------------------------------------------------------------------------- what --out may be


def test_folder_of_user_files_refused_untouched_unless_force(tmp_path, demo, hevisum):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(mine)
    with pytest.raises(HevisumError, match=r"hevisum did not write.*--force"):
        with atomic_dir(mine) as tmp:
            raise AssertionError("no work may start")
    one_error_line(hevisum("preprocess", demo, "--out", mine, "--quiet"), "did not write", "--force")
    one_error_line(hevisum("run", demo, "--out", mine, "--quiet"), "did not write", "--force")
    one_error_line(hevisum("predict", tmp_path / "run", demo, "--out", mine, "--quiet"), "did not write")
    assert snapshot(mine) == before and leftovers(tmp_path) == []
    # --force: replaced, once the new content is complete
    with atomic_dir(mine, force=True) as tmp:
        assert snapshot(mine) == before
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(mine)) == [MARKER, "new.txt"] and leftovers(tmp_path) == []


def test_input_or_its_folder_as_out_refused_even_with_force(tmp_path, demo, hevisum):
    data = demo.parent
    before = snapshot(data)
    for force in ([], ["--force"]):
        one_error_line(hevisum("preprocess", demo, "--out", data, "--quiet", *force), "holds", "d.h5", "reads")
        one_error_line(hevisum("run", demo, "--out", data, "--quiet", *force), "holds", "d.h5")
        one_error_line(hevisum("preprocess", demo, "--out", demo, "--quiet", *force), "is an input")
        one_error_line(hevisum("convert", demo, demo, *force), "is the input")
    # the config file and the truth file of `run` are inputs too
    cfg_dir = tmp_path / "cfg"
    made_by_hevisum(cfg_dir, "run", {"config.toml": TINY_RUN_CONFIG})
    one_error_line(hevisum("run", demo, "--config", cfg_dir / "config.toml", "--out", cfg_dir), "config.toml", "reads")
    assert snapshot(data) == before and leftovers(data.parent) == []
    # a new folder inside an input folder deletes nothing: allowed; an existing one there is not replaced
    assert check_output(data / "new", protect=[data]) == (data / "new").resolve()
    (data / "old").mkdir()
    (data / "old" / "x.txt").write_text("x")
    with pytest.raises(HevisumError, match="inside"):
        check_output(data / "old", protect=[data], force=True)
    (data / "old" / "x.txt").unlink()
    (data / "old").rmdir()


def test_predict_into_its_run_folder_refused(tmp_path, demo, hevisum):
    run = made_by_hevisum(tmp_path / "run", "run", {"metrics.json": "{}", "models/m/fold_1/model.bin": "w"})
    before = snapshot(run)
    for out in (run, tmp_path, run / "models"):
        for force in ([], ["--force"]):
            r = hevisum("predict", run, demo, "--out", out, "--quiet", *force)
            one_error_line(r, "reads")
    assert snapshot(run) == before and leftovers(tmp_path) == []
    # beside or inside the run folder, a new folder is fine (nothing is deleted)
    check_output(tmp_path / "pred", protect=[run], kind="predict")
    check_output(run / "pred", protect=[run], kind="predict")


def test_existing_file_refused_unless_force(tmp_path, demo, hevisum):
    f = tmp_path / "results"
    f.write_text("precious")
    one_error_line(hevisum("preprocess", demo, "--out", f, "--quiet"), "existing file")
    one_error_line(hevisum("run", demo, "--out", f, "--quiet"), "existing file", "--force")
    with pytest.raises(HevisumError, match="existing file"):
        with atomic_dir(f):
            pass
    assert f.read_text() == "precious" and leftovers(tmp_path) == []
    with atomic_dir(f, force=True) as tmp:
        (tmp / "a.txt").write_text("a")
    assert f.is_dir() and (f / "a.txt").read_text() == "a" and leftovers(tmp_path) == []


def test_convert_output_file_rules(tmp_path, demo, hevisum):
    theirs = tmp_path / "theirs.h5"
    theirs.write_bytes(b"not ours")
    one_error_line(hevisum("convert", demo, theirs), "did not write", "--force")
    assert theirs.read_bytes() == b"not ours"
    r = hevisum("convert", demo, theirs, "--force")
    assert r.returncode == 0, r.stderr
    assert theirs.read_bytes() != b"not ours"
    # a file `hevisum convert` wrote is replaced without --force (.h5 and .h5ad)
    for name in ("again.h5", "again.h5ad"):
        for _ in range(2):
            r = hevisum("convert", demo, tmp_path / name)
            assert r.returncode == 0, r.stderr
    # a folder: one line
    (tmp_path / "folder").mkdir()
    one_error_line(hevisum("convert", demo, tmp_path / "folder"), "is a folder")
    assert leftovers(tmp_path) == []


def test_kinds_are_not_mixed(tmp_path):
    made_by_hevisum(tmp_path / "p", "predict", {"predictions.csv": "x"})
    with pytest.raises(HevisumError, match="hevisum predict output, not a run output"):
        check_output(tmp_path / "p", kind="run")
    check_output(tmp_path / "p", kind="predict")
    check_output(tmp_path / "p", kind="run", force=True)
    assert read_marker(tmp_path / "p")["kind"] == "predict"


def test_dot_home_and_root_refused_even_with_force(tmp_path, demo, hevisum, monkeypatch):
    here = tmp_path / "here"
    made_by_hevisum(here, "run", {"metrics.json": "{}"})  # even a previous run folder: it is where we stand
    before = snapshot(here)
    monkeypatch.chdir(here)
    for force in ([], ["--force"]):
        one_error_line(hevisum("preprocess", demo, "--out", ".", "--quiet", *force), "current folder")
        one_error_line(hevisum("run", demo, "--out", ".", "--quiet", *force), "current folder")
        one_error_line(hevisum("run", demo, "--out", "..", "--quiet", *force), "holds the current folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    one_error_line(hevisum("preprocess", demo, "--out", ".", "--quiet"), "current folder")
    assert snapshot(here) == before and list(empty.iterdir()) == []
    for p, what in (("/", "root folder"), (Path.home(), "home folder")):
        with pytest.raises(HevisumError, match=what):
            check_output(p, force=True)


def test_read_only_parent_is_one_line(tmp_path, demo, hevisum):
    with read_only(tmp_path / "ro") as ro:
        err = one_error_line(hevisum("preprocess", demo, "--out", ro / "w", "--quiet"), "not writable")
        assert str(ro) in err
        one_error_line(hevisum("convert", demo, ro / "x.h5"), "not writable", str(ro))
        one_error_line(hevisum("run", demo, "--out", ro / "run", "--quiet"), "not writable", str(ro))
        assert list(ro.iterdir()) == []


# ------------------------------------------------------------------------------- replacing, failures


def test_previous_output_replaced_only_when_the_new_one_is_complete(tmp_path):
    out = made_by_hevisum(tmp_path / "out", "run", {"metrics.json": "old", "models/a.bin": "old model"})
    before = snapshot(out)
    for error in (RuntimeError("midway"), HevisumError("bad input"), OSError(28, "No space left on device")):
        with pytest.raises(type(error)):
            with atomic_dir(out) as tmp:
                (tmp / "metrics.json").write_text("new, half done")
                raise error
        assert snapshot(out) == before and leftovers(tmp_path) == []
    with atomic_dir(out) as tmp:
        assert tmp == partial_path(out) and lock_path(out).is_file()
        (tmp / "metrics.json").write_text("new")
        assert snapshot(out) == before  # the previous output stays whole while the new one is built
    assert sorted(os.listdir(out)) == [MARKER, "metrics.json"] and (out / "metrics.json").read_text() == "new"
    assert leftovers(tmp_path) == [] and read_marker(out)["kind"] == "run"


def test_preprocess_cli_replaces_its_previous_output(tmp_path, demo, hevisum):
    w = tmp_path / "w"
    for _ in range(2):
        r = hevisum("preprocess", demo, "--out", w, "--quiet", "--tile-size", "18")
        assert r.returncode == 0, r.stderr
        assert (w / "tiles.npy").is_file() and read_marker(w) is not None
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------- concurrency


def test_second_writer_refused_while_the_first_holds_the_lock(tmp_path, demo, hevisum):
    out = tmp_path / "w"
    first = start_holder(out, kind="run")
    try:
        info = json.loads(lock_path(out).read_text())
        assert info["pid"] == first.pid
        with pytest.raises(HevisumError, match=rf"another hevisum command \(PID {first.pid}.*is writing"):
            with atomic_dir(out):
                raise AssertionError("no work may start")
        one_error_line(hevisum("preprocess", demo, "--out", out, "--quiet"), "another hevisum command",
                       str(first.pid))
        one_error_line(hevisum("run", demo, "--out", out, "--quiet"), "another hevisum command")
        assert (partial_path(out) / "result.txt").is_file()  # the first one's work is untouched
    finally:
        rc, err = finish(first)
    assert rc == 0, err
    assert (out / "result.txt").read_text() == "new; found " and leftovers(tmp_path) == []
    with atomic_dir(out) as tmp:  # free again
        (tmp / "second.txt").write_text("2")
    assert sorted(os.listdir(out)) == [MARKER, "second.txt"]


def test_stale_lock_and_leftover_partial_are_taken_over(tmp_path, capsys):
    out = tmp_path / "w"
    pid = dead_pid()
    lock_path(out).write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "time": "earlier"}))
    partial_path(out).mkdir()
    (partial_path(out) / "junk.txt").write_text("from the dead command")
    with atomic_dir(out) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "a.txt").write_text("a")
    err = capsys.readouterr().err
    assert "taking over the lock" in err and f"PID {pid}" in err and "clearing" in err
    assert sorted(os.listdir(out)) == [MARKER, "a.txt"] and leftovers(tmp_path) == []


def test_sigkilled_writer_leaves_a_lock_that_is_taken_over(tmp_path, capsys):
    out = tmp_path / "w"
    made_by_hevisum(out, "run", {"a.txt": "previous"})
    before = snapshot(out)
    holder = start_holder(out)
    holder.kill()
    holder.wait()
    holder.stdout.close()
    holder.stderr.close()
    holder.stdin.close()
    assert snapshot(out) == before and leftovers(tmp_path) == ["w.lock", "w.partial"]
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("b")
    assert f"PID {holder.pid}" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [MARKER, "b.txt"] and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_exits_128_plus_n_and_keeps_a_run_for_resume(tmp_path, sig):
    out = made_by_hevisum(tmp_path / "out", "run", {"a.txt": "previous"})
    before = snapshot(out)
    holder = start_holder(out, kind="run")
    holder.send_signal(sig)
    _, err = holder.communicate(timeout=60)
    assert holder.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"interrupted ({signal.Signals(sig).name})") and "--resume" in lines[0]
    # the previous output is intact, no lock, no hidden temporary folders; the unfinished work is kept
    assert snapshot(out) == before
    assert leftovers(tmp_path) == ["out.partial"] and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    # --resume continues from it; without --resume it would be cleared
    rc, err = finish(start_holder(out, kind="run", mode="resume"))
    assert rc == 0, err
    assert (out / "result.txt").read_text() == "new; found result.txt" and leftovers(tmp_path) == []


def test_signal_removes_the_work_folder_of_other_kinds(tmp_path):
    out = tmp_path / "w"
    holder = start_holder(out, kind="prep")
    holder.send_signal(signal.SIGTERM)
    _, err = holder.communicate(timeout=60)
    assert holder.returncode == 143 and err.strip() == "interrupted (SIGTERM)", err
    assert list(tmp_path.iterdir()) == []


def test_failure_in_a_subprocess_removes_the_work_folder_and_lock(tmp_path):
    out = made_by_hevisum(tmp_path / "out", "run", {"a.txt": "previous"})
    before = snapshot(out)
    rc, err = finish(start_holder(out), say="fail")
    assert rc == 1 and "failed midway" in err
    assert snapshot(out) == before and leftovers(tmp_path) == []


# ----------------------------------------------- hevisum run / predict (once they take force/resume)


@needs_run_kwargs
def test_run_interrupted_by_sigterm_then_resumed_then_predict(tmp_path, demo, hevisum):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_RUN_CONFIG)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hevisum.cli", "run", str(demo), "--out", str(out), "--config",
                             str(cfg), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    deadline = time.monotonic() + 120
    while not (partial_path(out) / "config.toml").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # stop it once it has started working
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (SIGTERM)") and "--resume" in err
    assert not out.exists() and leftovers(tmp_path) == ["run.partial"]
    r = hevisum("run", demo, "--out", out, "--config", cfg, "--quiet", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert leftovers(tmp_path) == [] and read_marker(out)["kind"] == "run"
    # predict: into a new folder fine, over its run folder refused, and a predict folder is no run folder
    pred = tmp_path / "pred"
    r = hevisum("predict", out, demo, "--out", pred, "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_marker(pred)["kind"] == "predict" and leftovers(tmp_path) == []
    one_error_line(hevisum("predict", out, demo, "--out", out, "--quiet", "--force"), "reads")
    one_error_line(hevisum("run", demo, "--out", pred, "--config", cfg, "--quiet"), "predict output")
