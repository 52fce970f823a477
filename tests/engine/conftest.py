"""Fixtures of the engine tests."""
import importlib.abc
import sys

import pytest

import engine_testutils as U


@pytest.fixture
def fake_npu(monkeypatch, tmp_path):
    """Make ``import torch_npu`` load the recording fake (tests/engine/fake_npu); yields the module.

    The fake's event log is ``tmp_path / "npu_events.jsonl"`` (also exported as FAKE_TORCH_NPU_LOG, so
    child processes append to it).
    """
    log = tmp_path / "npu_events.jsonl"
    monkeypatch.setenv("FAKE_TORCH_NPU_LOG", str(log))
    monkeypatch.syspath_prepend(U.FAKE_NPU_DIR)
    U.drop_fake_npu_modules()
    import torch_npu

    yield torch_npu
    U.drop_fake_npu_modules()


class _ImportSpy(importlib.abc.MetaPathFinder):
    """Records every attempt to locate a module named ``torch_npu`` (or a submodule)."""

    def __init__(self):
        self.lookups = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torch_npu" or fullname.startswith("torch_npu."):
            self.lookups.append(fullname)
        return None


@pytest.fixture
def torch_npu_spy(monkeypatch):
    """Yields a spy whose ``lookups`` list every ``torch_npu`` import/probe made during the test."""
    spy = _ImportSpy()
    monkeypatch.setattr(sys, "meta_path", [spy] + sys.meta_path)
    had = "torch_npu" in sys.modules
    yield spy
    if not had:
        sys.modules.pop("torch_npu", None)


@pytest.fixture
def tiny_dataset(tmp_path):
    """A registered 4-image, 2-class COCO-format dataset; yields its name."""
    name = U.register_tiny_coco(str(tmp_path / "data"), num_images=4)
    yield name
    U.unregister(name)


@pytest.fixture(autouse=True)
def _no_leaked_dist_env(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    yield
