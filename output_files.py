"""How this project writes its files: never half-written (a temporary file renamed into place), JSON that every
parser reads (no NaN), and one-line reasons why a path cannot be written, checked before any work starts."""

import contextlib
import json
import math
import os
import secrets
import tempfile
from pathlib import Path


def write_text_atomically(text, path):
    """Write text (UTF-8, line endings untouched) to path via a temp file and os.replace.

    A reader never sees a half-written file: the temp file sits in the same directory (so the
    rename is atomic on one filesystem) and is removed on any exception, Ctrl-C included.
    """
    path = Path(path)
    # a plain exclusive open (not mkstemp, which makes the file 0600) gives a new file the usual
    # mode; an existing file keeps its own
    temp_name = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp_name, "x", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(temp_name, path.stat().st_mode & 0o777)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def why_not_writable(path, directory=False):
    """None when `path` (a file, or with directory=True a directory) can be written; else the reason, one line.

    Checks what a write would hit: a directory where a file is wanted or the reverse, a file among the parents,
    and whether a file can be created in the nearest existing directory (tried, because permissions alone do not
    tell: root ignores them, a read-only mount does not).
    """
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        return f"{path} is a file, not a directory; choose another place"
    if not directory and path.is_dir():
        return f"{path} is a directory; name a file"
    existing = path if directory else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{path}: {existing} is a file, so nothing can be created under it; choose another place"
    try:
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        return f"{existing}: cannot be written ({error.strerror}); check its permissions or choose another place"
    return None


def write_csv_atomically(df, path):
    """Write df as CSV (no index, "\\n" line endings) to path via a temp file and os.replace."""
    write_text_atomically(df.to_csv(index=False, lineterminator="\n"), path)


def strict_json(data):
    """JSON text (indented, newline at the end) that every parser reads: NaN and infinities become null."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(data), indent=2, allow_nan=False) + "\n"
