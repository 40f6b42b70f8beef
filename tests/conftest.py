"""Fixtures shared by several test files."""

import os
import subprocess

import pytest


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory in which no file can be created, whoever runs the tests.

    Permissions stop an ordinary user; root ignores them, so as root the directory is made immutable (chattr +i,
    ext4 and most Linux filesystems). Skipped where neither works.
    """
    path = tmp_path / "read-only"
    path.mkdir()
    (path / "existing.txt").write_text("kept\n")
    if os.geteuid() != 0:
        path.chmod(0o555)
        undo = lambda: path.chmod(0o755)  # noqa: E731
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(path)], check=True)  # noqa: E731
    else:
        pytest.skip("cannot make a read-only directory here (root without chattr)")
    try:
        if can_create_file(path):
            pytest.skip("the read-only directory can still be written here")
        yield path
    finally:
        undo()


def can_create_file(directory):
    try:
        (directory / "probe").write_text("x")
    except OSError:
        return False
    (directory / "probe").unlink()
    return True
