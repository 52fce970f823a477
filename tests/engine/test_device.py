"""Device resolution, early errors, lazy torch_npu import and per-worker NPU runtime knobs."""
import importlib.util
import os

import pytest
import torch

import engine_testutils as U
from fsaf_d2.engine import device as D
from fsaf_d2.engine.launch import launch

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "spec, expected",
    [("cpu", ("cpu", None)), ("cuda", ("cuda", None)), ("cuda:3", ("cuda", 3)), ("npu", ("npu", None)),
     ("NPU:1", ("npu", 1)), (" cuda:0 ", ("cuda", 0)), (torch.device("cpu"), ("cpu", None))],
)
def test_parse_device(spec, expected):
    assert D.parse_device(spec) == expected


@pytest.mark.parametrize(
    "spec, match",
    [("tpu", "Unsupported device 'tpu'"), ("cuda:x", "non-negative integer"), ("cpu:0", "takes no index"),
     ("", "non-empty"), ("mps", "supports cpu, cuda, npu")],
)
def test_parse_device_errors(spec, match):
    with pytest.raises(D.DeviceError, match=match):
        D.parse_device(spec)


def test_backend_map():
    assert [D.dist_backend(t) for t in ("cuda", "npu", "cpu")] == ["nccl", "hccl", "gloo"]


def test_cpu_resolution_and_helpers_never_touch_torch_npu(torch_npu_spy):
    assert D.resolve_device("cpu") == torch.device("cpu")
    D.synchronize("cpu")
    D.set_device("cpu", 3)
    D.manual_seed_all("cpu", 0)
    D.check_device_available("cpu", num_local_workers=64)  # CPU workers are processes, not devices
    assert D.max_memory_allocated("cpu") is None and D.current_device("cpu") is None
    assert D.dist_backend("cpu") == "gloo"
    assert torch_npu_spy.lookups == []


@needs_no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_unavailable_cuda_fails_early(spec, torch_npu_spy):
    with pytest.raises(D.DeviceError, match=r"cuda is not available.*MODEL.DEVICE cpu"):
        D.resolve_device(spec)
    assert torch_npu_spy.lookups == []


@needs_no_cuda
def test_launch_fails_before_spawning_on_missing_device():
    def never_called():  # pragma: no cover
        raise AssertionError("main must not run")

    with pytest.raises(D.DeviceError, match="cuda is not available"):
        launch(never_called, 2, device_type="cuda", dist_url="auto")


# ---------------------------------------------------------------------------------------------- NPU


def test_npu_without_torch_npu_names_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch_npu" else real(n, *a))
    with pytest.raises(D.DeviceError) as e:
        D.resolve_device("npu:0")
    msg = str(e.value)
    assert "torch_npu is not installed" in msg and "CANN" in msg and "set_env.sh" in msg
    assert torch.__version__ in msg  # says which torch the torch-npu wheel must match


def test_npu_without_cann_environment(monkeypatch):
    monkeypatch.syspath_prepend(U.FAKE_NPU_DIR)
    monkeypatch.setenv("FAKE_TORCH_NPU_IMPORT_ERROR", "1")  # import fails like a shell without set_env.sh
    U.drop_fake_npu_modules()
    with pytest.raises(D.DeviceError, match=r"(?s)import torch_npu` failed: libhccl.so.*set_env.sh"):
        D.resolve_device("npu")
    U.drop_fake_npu_modules()


def test_npu_resolution_with_fake_torch_npu(fake_npu, monkeypatch):
    # (torch.device("npu") itself is checked in the spawned fake-NPU workers of test_comm.py)
    D.check_device_available("npu:1")
    assert D.get_device_api("npu").module is fake_npu.npu
    with pytest.raises(D.DeviceError, match="torch does not know the device type 'npu'"):
        D.resolve_device("npu")  # the in-process fake does not register the device type
    D.set_device("npu", 2)
    assert D.current_device("npu") == 2
    assert D.max_memory_allocated("npu") == 3 * 2**20
    monkeypatch.setenv("FAKE_NPU_DEVICE_COUNT", "2")
    with pytest.raises(D.DeviceError, match="only 2 npu device"):
        D.resolve_device("npu:5")
    with pytest.raises(D.DeviceError, match=r"4 worker processes .* only 2 npu device.*ASCEND_RT_VISIBLE_DEVICES"):
        D.check_device_available("npu", num_local_workers=4)
    with pytest.raises(D.DeviceError, match="names one device"):
        D.check_device_available("npu:0", num_local_workers=2)


def test_npu_runtime_knobs_applied_from_config(fake_npu, monkeypatch):
    from detectron2.config import get_cfg

    import fsaf_d2
    from fsaf_d2.engine import add_engine_config

    cfg = get_cfg()
    fsaf_d2.add_fsaf_config(cfg)
    add_engine_config(cfg)
    cfg.MODEL.DEVICE = "npu"
    cfg.NPU.JIT_COMPILE = False
    cfg.NPU.ALLOW_HF32 = False
    cfg.NPU.ENV = ["TASK_QUEUE_ENABLE=2", "HCCL_CONNECT_TIMEOUT=1200"]
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "")  # recorded, so that the value the code sets is undone after
    monkeypatch.delenv("TASK_QUEUE_ENABLE")
    monkeypatch.setenv("HCCL_CONNECT_TIMEOUT", "77")  # set by the user: must win over the config default
    D.apply_device_runtime(cfg)
    assert os.environ["TASK_QUEUE_ENABLE"] == "2"
    assert os.environ["HCCL_CONNECT_TIMEOUT"] == "77"
    events = [(e["event"], e.get("jit_compile", e.get("module"))) for e in fake_npu.EVENTS]
    assert ("set_compile_mode", False) in events
    assert ("allow_hf32", "conv") in events and ("allow_hf32", "matmul") in events
    assert fake_npu.npu.conv.allow_hf32 is False and fake_npu.npu.matmul.allow_hf32 is False

    cfg.NPU.ENV = ["NO_EQUALS_SIGN"]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        D.apply_device_runtime(cfg)


def test_runtime_knobs_are_a_no_op_off_npu(torch_npu_spy):
    from detectron2.config import get_cfg

    import fsaf_d2
    from fsaf_d2.engine import add_engine_config

    cfg = get_cfg()
    fsaf_d2.add_fsaf_config(cfg)
    add_engine_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.NPU.ENV = ["FSAF_SHOULD_NOT_BE_SET=1"]
    D.apply_device_runtime(cfg)
    assert "FSAF_SHOULD_NOT_BE_SET" not in os.environ
    assert torch_npu_spy.lookups == []


def test_pre_launch_sets_npu_env_before_any_torch_npu_import(monkeypatch, torch_npu_spy):
    import argparse

    from fsaf_d2.engine import pre_launch

    monkeypatch.setenv("TASK_QUEUE_ENABLE", "")  # recorded, so that the value the code sets is undone after
    monkeypatch.delenv("TASK_QUEUE_ENABLE")
    args = argparse.Namespace(config_file="", opts=["MODEL.DEVICE", "npu:0", "NPU.ENV", "['TASK_QUEUE_ENABLE=2']"])
    assert pre_launch(args) == "npu:0"
    assert os.environ["TASK_QUEUE_ENABLE"] == "2"  # inherited by the workers launch() spawns
    assert torch_npu_spy.lookups == []
