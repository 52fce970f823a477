"""Test-only fault injection: Python imports this at start-up when this folder is on PYTHONPATH.

``FSAF_TEST_KILL_AT="<op>:<pattern>:<n>"`` sends SIGKILL to this process (a real ``kill -9``) the n-th time
(1-based) the operation touches a file whose name matches the shell pattern ``<pattern>``:

* ``fsync:<pattern>``: the fsync of the temporary file of a matching file (``fsaf_d2.utils.io.atomic_write``
  names it ``.<basename>.<random>.tmp``): the data is complete on disk, the rename has not happened;
* ``replace:<pattern>``: ``os.replace`` onto a matching file: the rename that publishes it is interrupted.
"""
import fnmatch
import os
import signal

_SPEC = os.environ.get("FSAF_TEST_KILL_AT")

if _SPEC:
    _op, _pattern, _nth = _SPEC.split(":")
    _calls = [0]

    def _count(basename):
        if fnmatch.fnmatch(basename, _pattern):
            _calls[0] += 1
            if _calls[0] == int(_nth):
                os.kill(os.getpid(), signal.SIGKILL)

    if _op == "replace":
        _real_replace = os.replace

        def _replace(src, dst, *args, **kwargs):
            _count(os.path.basename(os.fspath(dst)))
            return _real_replace(src, dst, *args, **kwargs)

        os.replace = _replace
    elif _op == "fsync":
        _real_fsync = os.fsync

        def _fsync(fd):
            try:
                name = os.path.basename(os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}"))
            except OSError:
                name = ""
            if name.startswith(".") and name.endswith(".tmp"):
                _count(name[1:].rsplit(".", 2)[0])  # .<basename>.<random>.tmp -> <basename>
            return _real_fsync(fd)

        os.fsync = _fsync
    else:
        raise ValueError(f"FSAF_TEST_KILL_AT: unknown operation {_op!r} in {_SPEC!r}")
