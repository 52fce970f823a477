"""Project-wide pytest configuration."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: multi-process end-to-end tests (tens of seconds each); deselect with -m 'not slow'",
    )


@pytest.fixture(autouse=True)
def _torch_thread_count_unchanged():
    """Give back torch's thread count after each test: the tools run in-process with ``--threads`` set it,
    and every later test (and the thread count a test passes on to its child processes) would inherit it."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
