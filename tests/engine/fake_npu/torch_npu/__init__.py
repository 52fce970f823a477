"""A fake ``torch_npu`` for the engine tests: records calls, runs everything on the CPU.

What it imitates (see docs/devices.md for what the real package does):

* ``torch_npu.npu``: is_available / device_count / set_device / current_device / synchronize / memory
  and seed calls, ``set_compile_mode``, ``is_bf16_supported``, ``conv.allow_hf32`` / ``matmul.allow_hf32``,
  ``amp.GradScaler``;
* ``torch_npu.optim.NpuFusedSGD`` (plain SGD plus ``clip_grad_norm_fused_``);
* with ``FAKE_NPU_REGISTER_DEVICE=1``: the privateuse1 backend renamed to "npu" and ``torch.npu``
  registered, so ``torch.device("npu:0")`` parses (spawned workers only: it is process-wide);
* an "hccl" process-group backend (gloo underneath) whose ``gather`` raises like ProcessGroupHCCL (on
  an hccl group only: a gloo side group gathers as usual).

Every call is appended as one JSON line to ``$FAKE_TORCH_NPU_LOG`` (if set) and to ``EVENTS``.
Environment: ``FAKE_NPU_DEVICE_COUNT`` (default 8), ``FAKE_NPU_BF16`` (default 1),
``FAKE_TORCH_NPU_IMPORT_ERROR`` (1: fail at import like a machine without CANN).
"""
import json
import os
import sys
import types

if os.environ.get("FAKE_TORCH_NPU_IMPORT_ERROR") == "1":
    raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")

import torch
import torch.distributed as dist

__version__ = torch.__version__ + ".fake"
EVENTS = []


def _record(event, **info):
    entry = {"event": event, "pid": os.getpid(), **info}
    EVENTS.append(entry)
    path = os.environ.get("FAKE_TORCH_NPU_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


_record("import")

# ---------------------------------------------------------------------------------------------- torch_npu.npu
npu = types.ModuleType("torch_npu.npu")
_current = {"device": 0, "peak": 0}


def is_available():
    return True


def device_count():
    return int(os.environ.get("FAKE_NPU_DEVICE_COUNT", "8"))


def set_device(device):
    index = int(str(device).split(":")[-1])
    _current["device"] = index
    _record("set_device", index=index)


def current_device():
    return _current["device"]


def synchronize(device=None):
    _record("synchronize")


def max_memory_allocated(device=None):
    return 3 * 2**20


def reset_peak_memory_stats(device=None):
    _record("reset_peak_memory_stats")


def manual_seed_all(seed):
    _record("manual_seed_all", seed=int(seed))


def set_compile_mode(jit_compile=True):
    _record("set_compile_mode", jit_compile=bool(jit_compile))


def is_bf16_supported():
    return os.environ.get("FAKE_NPU_BF16", "1") == "1"


class _HF32Flags:
    def __init__(self, name):
        self._name = name
        self._value = False

    @property
    def allow_hf32(self):
        return self._value

    @allow_hf32.setter
    def allow_hf32(self, value):
        self._value = bool(value)
        _record("allow_hf32", module=self._name, value=bool(value))


class GradScaler(torch.amp.GradScaler):
    """Stands for torch_npu.npu.amp.GradScaler (runs the CPU implementation)."""

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                 enabled=True, dynamic=True):
        _record("GradScaler", enabled=bool(enabled))
        super().__init__("cpu", init_scale=init_scale, growth_factor=growth_factor,
                         backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled)


for _fn in (is_available, device_count, set_device, current_device, synchronize, max_memory_allocated,
            reset_peak_memory_stats, manual_seed_all, set_compile_mode, is_bf16_supported):
    setattr(npu, _fn.__name__, _fn)
npu.conv = _HF32Flags("conv")
npu.matmul = _HF32Flags("matmul")
npu.amp = types.ModuleType("torch_npu.npu.amp")
npu.amp.GradScaler = GradScaler
sys.modules["torch_npu.npu"] = npu
sys.modules["torch_npu.npu.amp"] = npu.amp

# ---------------------------------------------------------------------------------------------- torch_npu.optim
optim = types.ModuleType("torch_npu.optim")


class NpuFusedSGD(torch.optim.SGD):
    """Stands for torch_npu.optim.NpuFusedSGD."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False):
        _record("NpuFusedSGD")
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov)

    def clip_grad_norm_fused_(self, max_norm, norm_type=2.0):
        _record("clip_grad_norm_fused_", max_norm=float(max_norm))
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)


optim.NpuFusedSGD = NpuFusedSGD
sys.modules["torch_npu.optim"] = optim

# ---------------------------------------------------------------------------------------------- device type
# Like the real package: rename privateuse1 to "npu" and register torch.npu (so torch.device("npu:0")
# parses). This changes the process-wide accelerator, so it is opt-in (FAKE_NPU_REGISTER_DEVICE=1) and
# used in spawned worker processes only, never inside the pytest process.
if os.environ.get("FAKE_NPU_REGISTER_DEVICE") == "1" and not hasattr(torch, "npu"):
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(rename="npu", backend_module=npu)

# ---------------------------------------------------------------------------------------------- "hccl"


def _create_hccl(store, rank, size, timeout):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


if "hccl" not in dist.Backend.backend_list:
    dist.Backend.register_backend("hccl", _create_hccl, devices=["cpu"])

if not getattr(dist.init_process_group, "_fake_npu", False):
    _init = dist.init_process_group
    _gather, _gather_object = dist.gather, dist.gather_object

    def init_process_group(*args, **kwargs):
        backend = kwargs.get("backend", args[0] if args else None)
        _record("init_process_group", backend=str(backend), rank=kwargs.get("rank"))
        return _init(*args, **kwargs)

    def _no_gather(real):
        def wrapper(*args, **kwargs):
            group = kwargs.get("group", args[3] if len(args) > 3 else None)  # gather(_object)(x, out, dst, group)
            if dist.get_backend(group) == "hccl":
                _record("gather")
                raise RuntimeError("ProcessGroupHCCL does not support gather")
            return real(*args, **kwargs)

        return wrapper

    init_process_group._fake_npu = True
    dist.init_process_group = init_process_group
    dist.gather = _no_gather(_gather)
    dist.gather_object = _no_gather(_gather_object)
