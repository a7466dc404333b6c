"""Write outputs so that nothing is half-written and nothing that is not ours is deleted.

Files: :func:`atomic_path` writes to a temporary name beside the target, then renames it onto the target.

Folders: :func:`atomic_dir` builds a command's output folder ``OUT`` in the visible work folder ``OUT.partial``
beside it, holding the lock ``OUT.lock`` meanwhile, and puts the finished folder in place only once it is
complete. Before any work it refuses an ``OUT`` that is not safe to replace (see :func:`check_output`).
docs/reliability.md ("Output folders") lists the guarantees.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from hevisum.errors import HevisumError

MARKER = ".hevisum-run.json"  # written into every finished output folder: {"kind", "version", "time", "host"}
PARTIAL_SUFFIX = ".partial"  # OUT.partial: the work folder of the command writing OUT
LOCK_SUFFIX = ".lock"  # OUT.lock: held (flock) by the command writing OUT; JSON {"pid", "host", "time", ...}
RESUMABLE_KINDS = frozenset({"run"})  # interrupted outputs of these kinds keep OUT.partial for --resume

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the final file the usual permissions (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def check_output_file(path: PathLike, *, force: bool = False, protect: Iterable[PathLike | None] = (),
                      ours: Callable[[Path], bool] | None = None) -> Path:
    """Check, before any work, that the output file ``path`` may be written; return it resolved.

    Refused (one-line :class:`HevisumError`): a folder; a file this command reads (``protect``) or an existing
    file inside a folder it reads, even with ``force``; an existing file that ``ours`` does not recognise as
    one hevisum wrote, unless ``force``; a folder that cannot be written to.
    """
    shown = str(path)
    real = _real(path)
    exists = os.path.lexists(real)
    for p in _protected(protect):
        if real == p:
            raise HevisumError(f"output {shown!r} is the input {str(p)!r} this command reads; writing it would "
                               "delete that input; choose another output file name")
        if exists and p in real.parents:
            raise HevisumError(f"output {shown!r} already exists inside the input {str(p)!r} this command reads; "
                               "replacing it would change that input; choose another output file name")
    if real.is_dir():
        raise HevisumError(f"output {shown!r} is a folder; give a file name, e.g. {str(Path(shown) / 'out.h5')!r}")
    if exists and not force and not (ours is not None and ours(real)):
        raise HevisumError(f"output {shown!r} is an existing file that hevisum did not write; choose a new file "
                           "name, or pass --force to replace it")
    _check_writable_parent(real, shown)
    return real


# ------------------------------------------------------------------------------------------------- folders


def partial_path(path: PathLike) -> Path:
    """The work folder of the command writing ``path``: ``path.partial`` beside it."""
    p = _real(path)
    return p.with_name(p.name + PARTIAL_SUFFIX)


def lock_path(path: PathLike) -> Path:
    """The lock file of the command writing ``path``: ``path.lock`` beside it."""
    p = _real(path)
    return p.with_name(p.name + LOCK_SUFFIX)


def read_marker(folder: PathLike) -> dict | None:
    """The marker of a finished hevisum output folder (``{"kind", "version", ...}``), or None."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def check_output(path: PathLike, *, force: bool = False, protect: Iterable[PathLike | None] = (),
                 kind: str = "run") -> Path:
    """Check, before any work, that the output folder ``path`` may be (re)placed; return it resolved.

    Accepted: a new path, an empty folder, a finished hevisum output folder of the same ``kind``, and with
    ``force`` any other file or folder. Refused always (``force`` or not): ``/``, the home folder, the
    current folder and the folders holding these; a path that equals or holds one of ``protect`` (the files
    and folders the command reads), or a non-empty one inside them; an output another live command holds the
    lock of. Each refusal is one :class:`HevisumError` line.
    """
    return _check_output(path, force=force, protect=protect, kind=kind, probe_lock=True)


def _check_output(path: PathLike, *, force: bool, protect: Iterable[PathLike | None], kind: str,
                  probe_lock: bool) -> Path:
    shown = str(path)
    real = _real(path)
    places = []
    with contextlib.suppress(RuntimeError, KeyError):  # no home folder known
        places.append(("your home folder", _real(Path.home())))
    with contextlib.suppress(OSError):  # the current folder may have been deleted
        places.append(("the current folder", _real(os.getcwd())))
    advice = "give a new folder name, e.g. 'runs/demo'"
    if real == Path(real.anchor):
        raise HevisumError(f"output folder {shown!r} is the root folder; {advice}")
    for what, p in places:
        if real == p:
            raise HevisumError(f"output folder {shown!r} is {what}; writing the output there would replace it; "
                               f"{advice}")
        if real in p.parents:
            raise HevisumError(f"output folder {shown!r} holds {what} {str(p)!r}; writing the output there would "
                               f"delete it; {advice}")
    part, lock = real.with_name(real.name + PARTIAL_SUFFIX), real.with_name(real.name + LOCK_SUFFIX)
    exists = os.path.lexists(real)
    for p in _protected(protect):
        if real == p:
            raise HevisumError(f"output folder {shown!r} is an input this command reads ({str(p)!r}); writing "
                               f"the output there would delete it; {advice}")
        for gone in (real, part, lock):
            if gone in p.parents or gone == p:
                raise HevisumError(f"output folder {shown!r} holds {str(p)!r}, which this command reads; writing "
                                   f"the output there would delete it; {advice}")
        if p in real.parents and exists and not _empty_dir(real):
            raise HevisumError(f"output folder {shown!r} already exists inside {str(p)!r}, which this command "
                               f"reads; replacing it would change that input; {advice}")
    if exists and not force:
        if not real.is_dir():
            raise HevisumError(f"output folder {shown!r} is an existing file; {advice}, or pass --force to "
                               "replace it")
        entries = _listdir(real, shown)
        if entries:
            marker = read_marker(real)
            if marker is None:
                raise HevisumError(f"output folder {shown!r} holds {len(entries)} file(s) or folder(s) hevisum did "
                                   f"not write (e.g. {sorted(entries)[0]!r}); {advice}, or pass --force to "
                                   "replace it")
            if marker["kind"] != kind:
                raise HevisumError(f"output folder {shown!r} holds a hevisum {marker['kind']} output, not a {kind} "
                                   f"output; {advice}, or pass --force to replace it")
    holder = _Lock.holder(lock) if probe_lock else None
    if holder is not None:
        raise HevisumError(f"another hevisum command ({_describe(holder)}) is writing {shown!r}; wait for it to "
                           f"finish or stop it")
    _probe_writable(real, shown)
    return real


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, force: bool = False, resume: bool = False,
               protect: Iterable[PathLike | None] = (), kind: str = "run") -> Iterator[Path]:
    """Yield the work folder ``OUT.partial`` for the output folder ``path`` (OUT); on success it becomes OUT.

    - Before any work, :func:`check_output` refuses an OUT that is not safe to replace (one error line).
    - ``OUT.lock`` is held meanwhile: a second command into the same OUT is refused while this one runs;
      a lock left by a command that no longer runs is taken over (said on stderr).
    - A leftover ``OUT.partial`` of a command that no longer runs is cleared (said on stderr), unless
      ``resume``: then it is the work folder as it is.
    - Success: the marker file is written, and the finished folder replaces OUT in one rename (OUT is never
      half-written; a previous OUT is removed only after the new one is in place).
    - KeyboardInterrupt (Ctrl-C, or a signal turned into one): for resumable kinds (``run``) OUT.partial is
      kept for ``--resume`` and a note saying so is added to the exception; otherwise it is removed.
    - Any other error removes OUT.partial; except with ``resume``, where it is kept unless the error is a
      :class:`HevisumError` (bad input). OUT itself is untouched on every error.
    """
    shown = str(path)
    real = check_output(path, force=force, protect=protect, kind=kind)
    part, lock_file = real.with_name(real.name + PARTIAL_SUFFIX), real.with_name(real.name + LOCK_SUFFIX)
    part_shown = os.path.normpath(shown) + PARTIAL_SUFFIX
    kept = f"the unfinished output is kept in {part_shown!r}; the same command with --resume continues it"
    _mkdirs(real.parent, shown)
    lock = _Lock.acquire(lock_file, shown)
    try:
        # again, now that no one else can write there
        _check_output(path, force=force, protect=protect, kind=kind, probe_lock=False)
        if os.path.lexists(part):
            if resume and part.is_dir() and not part.is_symlink():
                _say(f"resuming from {part_shown!r}")
            else:
                _say(f"clearing {part_shown!r}, left unfinished by an earlier command")
                _remove(part)
        elif resume:
            _say(f"nothing to resume in {part_shown!r}; starting afresh")
        if not os.path.lexists(part):
            _os_call(os.mkdir, part, what=f"create the work folder {part_shown!r}")
    except BaseException:
        lock.release()
        raise
    try:
        try:
            yield part
        except KeyboardInterrupt as e:
            if kind in RESUMABLE_KINDS:
                e.add_note(kept)
            else:
                _remove(part)
            raise
        except HevisumError:
            _remove(part)
            raise
        except BaseException as e:
            if resume and kind in RESUMABLE_KINDS:
                e.add_note(kept)
            else:
                _remove(part)
            raise
        _install(part, real, kind, shown, part_shown)
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------------ internals


def _real(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _protected(paths: Iterable[PathLike | None]) -> list[Path]:
    return [_real(p) for p in paths if p is not None and os.fspath(p) != ""]


def _say(msg: str) -> None:
    print(f"[hevisum] {msg}", file=sys.stderr, flush=True)


def _empty_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and not _listdir(p, str(p))


def _listdir(p: Path, shown: str) -> list[str]:
    try:
        return os.listdir(p)
    except OSError as e:
        raise HevisumError(f"cannot read the output folder {shown!r}: {e.strerror}") from None


def _os_call(fn, *args, what: str):
    try:
        return fn(*args)
    except OSError as e:
        raise HevisumError(f"cannot {what}: {e.strerror or e}") from None


def _mkdirs(folder: Path, shown: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HevisumError(f"cannot create the folder {str(folder)!r} for the output {shown!r}: "
                           f"{e.strerror or e}") from None


def _probe_writable(real: Path, shown: str) -> None:
    """Try a file in the nearest existing folder above ``real``: a read-only one fails here, before any work."""
    folder = real.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise HevisumError(f"cannot write the output {shown!r}: the folder {str(folder)!r} is not writable "
                           f"({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def _check_writable_parent(real: Path, shown: str) -> None:
    """Create the parent folder and try a file in it: a read-only folder fails here, before any work."""
    _mkdirs(real.parent, shown)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    except OSError as e:
        raise HevisumError(f"cannot write the output {shown!r}: the folder {str(real.parent)!r} is not writable "
                           f"({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _install(part: Path, real: Path, kind: str, shown: str, part_shown: str) -> None:
    """Mark the finished work folder and put it in place of ``real``; the old content goes last."""
    from hevisum import __version__

    marker = {"kind": kind, "version": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "host": socket.gethostname()}
    try:
        atomic_write_text(part / MARKER, json.dumps(marker, indent=1) + "\n")
        if not os.path.lexists(real):
            os.rename(part, real)
        elif _exchange(part, real):
            _remove(part)  # now the previous content
        else:  # no atomic swap on this filesystem: OUT is missing for the moment between the two renames
            old = part / ".previous"
            os.rename(real, old)
            os.rename(part, real)
            _remove(real / ".previous")
    except OSError as e:
        raise HevisumError(f"the output is finished but could not be moved to {shown!r} ({e.strerror or e}); it "
                           f"is kept in {part_shown!r}") from None


def _describe(info: dict) -> str:
    bits = [f"PID {info.get('pid', '?')}"]
    if info.get("host") and info.get("host") != socket.gethostname():
        bits.append(f"on {info['host']}")
    if info.get("time"):
        bits.append(f"started {info['time']}")
    return " ".join(bits)


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Lock:
    """``OUT.lock``: an flock-ed file naming its holder. The kernel drops the flock when the holder dies (also
    on SIGKILL), so a lock file nobody holds is stale. Where flock is not supported, the holder's PID decides."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @staticmethod
    def _info(fd: int) -> dict | None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = json.loads(os.read(fd, 65536).decode() or "null")
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def _flock(fd: int, shared: bool = False) -> bool | None:
        """True: locked; False: someone else holds it; None: flock not supported here."""
        import fcntl

        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF):
                return None
            raise
        return True

    @staticmethod
    def _held_by_pid(info: dict | None) -> bool:
        """Without flock: is the recorded holder (on this host, not us) still running?"""
        if not info:
            return False
        if info.get("host") not in (None, socket.gethostname()):
            return True  # cannot tell; err on the safe side
        return info.get("pid") != os.getpid() and _pid_alive(info.get("pid"))

    @classmethod
    def holder(cls, path: Path) -> dict | None:
        """Who holds the lock at ``path`` now (None: nobody); takes nothing."""
        if os.name != "posix":
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            got = cls._flock(fd, shared=True)
            info = cls._info(fd)
            if got is False or (got is None and cls._held_by_pid(info)):
                return info or {}
            return None
        finally:
            os.close(fd)  # also drops the shared probe lock

    @classmethod
    def acquire(cls, path: Path, shown: str) -> "_Lock":
        for _ in range(5):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise HevisumError(f"cannot write the output {shown!r}: the folder {str(path.parent)!r} is not "
                                   f"writable ({e.strerror or e})") from None
            try:
                got = cls._flock(fd) if os.name == "posix" else None
                info = cls._info(fd)
                if got is False or (got is None and cls._held_by_pid(info)):
                    raise HevisumError(f"another hevisum command ({_describe(info or {})}) is writing {shown!r}; "
                                       "wait for it to finish or stop it")
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(path))
                except FileNotFoundError:
                    same = False
                if not same:  # its holder removed it while we opened it: start over with a fresh file
                    os.close(fd)
                    continue
                if info and info.get("pid") != os.getpid():
                    _say(f"taking over the lock {str(path)!r} left by {_describe(info)}, which is no longer "
                         "running")
                mine = {"pid": os.getpid(), "host": socket.gethostname(),
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(mine) + "\n").encode())
                os.fsync(fd)
                return cls(path, fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
        raise HevisumError(f"could not take the lock {str(path)!r} for {shown!r}; another command keeps "
                           "replacing it")

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.unlink(self.path)  # before unlocking, so no one can take a lock on a file about to go
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
