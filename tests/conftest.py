"""Fixtures shared by several test files."""

import os
import subprocess

import pytest


@pytest.fixture
def make_read_only():
    """A function that makes a directory one in which no file can be created or renamed, whoever runs the tests.

    Permissions stop an ordinary user; root ignores them, so as root the directory is made immutable (chattr +i,
    on ext4 and most Linux filesystems). The test is skipped where neither works; everything is undone after it.
    """
    undo = []

    def lock(path):
        if os.geteuid() != 0:
            path.chmod(0o555)
            undo.append(lambda: path.chmod(0o755))
        elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
            undo.append(lambda: subprocess.run(["chattr", "-i", str(path)], check=True))
        else:
            pytest.skip("cannot make a read-only directory here (root without chattr)")
        if can_create_file(path):
            pytest.skip("the read-only directory can still be written here")
        return path

    yield lock
    for step in reversed(undo):
        step()


@pytest.fixture
def read_only_dir(tmp_path, make_read_only):
    """An empty directory in which no file can be created."""
    path = tmp_path / "read-only"
    path.mkdir()
    return make_read_only(path)


def can_create_file(directory):
    try:
        (directory / "probe").write_text("x")
    except OSError:
        return False
    (directory / "probe").unlink()
    return True


def pytest_configure(config):
    """GPU_TEST_MEMORY_GIB=78 caps this test process's GPU memory (torch.cuda.set_per_process_memory_fraction), so
    that a card with more memory shows whether the GPU tests fit a smaller one (an 80 GB H100 on a 141 GB H200)."""
    cap = os.environ.get("GPU_TEST_MEMORY_GIB")
    if not cap:
        return
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) * 2**30 / total))


def pytest_collection_modifyitems(config, items):
    """The learning test (the whole main job, ~9 minutes on 2 cores) runs when asked for: `-m learning`, or its file
    named on the command line; `python -m pytest tests` leaves it out and says so."""
    if "learning" in (config.getoption("markexpr") or "") or any("test_learning_bar" in a for a in config.args):
        return
    left_out = [item for item in items if "learning" in item.keywords]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if "learning" not in item.keywords]
