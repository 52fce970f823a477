"""Project-wide pytest configuration."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: multi-process end-to-end tests (tens of seconds each); deselect with -m 'not slow'",
    )
