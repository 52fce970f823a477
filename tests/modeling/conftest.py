import pytest

from fsaf_testing import make_input


@pytest.fixture
def batch():
    return [
        make_input(96, 128, [[10, 10, 50, 60], [20, 20, 40, 40], [60, 5, 120, 90], [2, 2, 8, 8]], [0, 0, 2, 1]),
        make_input(128, 96, [], [], seed=1),
    ]
