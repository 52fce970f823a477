"""Device layer: one place that knows about CUDA, Ascend NPU and CPU.

Everything else in fsaf_d2 calls the helpers below instead of ``torch.cuda.*``:

* :func:`parse_device` / :func:`resolve_device` turn ``MODEL.DEVICE`` ("cpu", "cuda", "cuda:N", "npu",
  "npu:N") into a ``torch.device`` and fail early, naming the problem, when the device is unusable.
* ``torch_npu`` is imported **only** for npu devices (:func:`import_torch_npu`), lazily, so the plugin
  stays importable on machines without it.
* :func:`get_device_api` returns a small object with the per-device runtime calls (``is_available``,
  ``device_count``, ``set_device``, ``current_device``, ``synchronize``, ``max_memory_allocated``,
  ``reset_peak_memory_stats``, ``manual_seed_all``); the module-level wrappers take a device type or
  device string.
* :func:`dist_backend` maps a device type to its process-group backend (nccl / hccl / gloo).
* :func:`apply_device_runtime` applies the ``NPU.*`` config knobs in a worker.
"""
import importlib
import importlib.util
import logging
import os
from typing import Optional, Tuple, Union

import torch

__all__ = [
    "SUPPORTED_DEVICE_TYPES",
    "DeviceError",
    "parse_device",
    "device_type_of",
    "import_torch_npu",
    "get_device_api",
    "resolve_device",
    "check_device_available",
    "dist_backend",
    "is_accelerator",
    "is_available",
    "device_count",
    "set_device",
    "current_device",
    "synchronize",
    "max_memory_allocated",
    "reset_peak_memory_stats",
    "manual_seed_all",
    "apply_npu_env_defaults",
    "apply_device_runtime",
]

logger = logging.getLogger(__name__)

#: device types fsaf_d2 knows how to run on
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "npu")

_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}

_NPU_INSTALL_HINT = (
    "Install the torch-npu wheel whose version matches torch (torch-npu X.Y.Z[.postN] for torch X.Y.Z; "
    "installed torch is {torch}) and the Ascend CANN toolkit it is paired with (see the compatibility table "
    "in Ascend/pytorch), then run `source <ascend-toolkit>/set_env.sh` (e.g. "
    "/usr/local/Ascend/ascend-toolkit/set_env.sh) in the shell that starts training. "
    "Use MODEL.DEVICE cpu or cuda on machines without an Ascend NPU."
)


class DeviceError(RuntimeError):
    """A requested device cannot be used (unknown, not available, driver/toolkit missing)."""


DeviceLike = Union[str, torch.device]


def parse_device(spec: DeviceLike) -> Tuple[str, Optional[int]]:
    """Split a device spec into ``(type, index)`` without touching any device runtime.

    Args:
        spec: "cpu", "cuda", "cuda:1", "npu", "npu:0", or a ``torch.device``.

    Returns:
        (device_type, index or None)
    """
    if isinstance(spec, torch.device):
        return spec.type, spec.index
    if not isinstance(spec, str) or not spec.strip():
        raise DeviceError(f"MODEL.DEVICE must be a non-empty string like 'cuda', 'npu:0' or 'cpu', got {spec!r}")
    text = spec.strip().lower()
    dtype, sep, idx = text.partition(":")
    if dtype not in SUPPORTED_DEVICE_TYPES:
        raise DeviceError(
            f"Unsupported device {spec!r} (MODEL.DEVICE). fsaf_d2 supports {', '.join(SUPPORTED_DEVICE_TYPES)} "
            "with an optional ':N' index for cuda and npu."
        )
    if not sep:
        return dtype, None
    if dtype == "cpu":
        raise DeviceError(f"Device {spec!r}: 'cpu' takes no index; use MODEL.DEVICE cpu")
    if not idx.isdigit():
        raise DeviceError(f"Device {spec!r}: the index after ':' must be a non-negative integer")
    return dtype, int(idx)


def device_type_of(spec: DeviceLike) -> str:
    """The device type ("cpu", "cuda" or "npu") of a device spec."""
    return parse_device(spec)[0]


def is_accelerator(device_type: str) -> bool:
    """True for device types that have their own memory and device index (cuda, npu)."""
    return device_type in ("cuda", "npu")


def dist_backend(device_type: str) -> str:
    """torch.distributed backend for a device type: cuda -> nccl, npu -> hccl, cpu -> gloo."""
    try:
        return _BACKENDS[device_type]
    except KeyError:
        raise DeviceError(f"No distributed backend known for device type {device_type!r}") from None


# ---------------------------------------------------------------------------------------------- torch_npu


def import_torch_npu():
    """Import ``torch_npu`` (Ascend PyTorch adapter) or raise a :class:`DeviceError` saying what to install.

    Probing uses ``importlib.util.find_spec`` first, so nothing is imported when the package is absent.
    ``import torch_npu`` raises ImportError (missing CANN libraries such as libhccl.so / libascendcl.so)
    or RuntimeError (e.g. a second accelerator is already active) when the runtime is not usable; both
    are reported with installation hints.
    """
    try:
        spec = importlib.util.find_spec("torch_npu")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DeviceError(
            "MODEL.DEVICE requests an Ascend NPU, but the Python package torch_npu is not installed. "
            + _NPU_INSTALL_HINT.format(torch=torch.__version__)
        )
    try:
        return importlib.import_module("torch_npu")
    except (ImportError, RuntimeError) as e:
        raise DeviceError(
            f"MODEL.DEVICE requests an Ascend NPU, but `import torch_npu` failed: {e}\n"
            "This usually means the CANN environment is not set up in this shell (libascendcl.so / "
            "libhccl.so not found) or torch-npu does not match torch. "
            + _NPU_INSTALL_HINT.format(torch=torch.__version__)
        ) from e


# ---------------------------------------------------------------------------------------------- device APIs


class _CPUDeviceAPI:
    """The CPU counterpart of ``torch.cuda``: always available, no memory statistics, no-op sync."""

    name = "cpu"

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        # CPU workers are processes, not devices: the number of local workers is not limited by this.
        return os.cpu_count() or 1

    @staticmethod
    def set_device(index) -> None:
        return None

    @staticmethod
    def current_device() -> Optional[int]:
        return None

    @staticmethod
    def synchronize(device=None) -> None:
        return None

    @staticmethod
    def max_memory_allocated(device=None) -> Optional[int]:
        return None

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        return None

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        return None


class _ModuleDeviceAPI:
    """Adapter over a ``torch.cuda``-like module (``torch.cuda`` or ``torch_npu.npu``).

    Args:
        name: device type ("cuda" or "npu").
        module: the runtime module exposing is_available, device_count, set_device, ... .
    """

    def __init__(self, name: str, module):
        self.name = name
        self.module = module

    def is_available(self) -> bool:
        return bool(self.module.is_available())

    def device_count(self) -> int:
        return int(self.module.device_count())

    def set_device(self, index) -> None:
        self.module.set_device(index)

    def current_device(self) -> int:
        return int(self.module.current_device())

    def synchronize(self, device=None) -> None:
        if device is None:
            self.module.synchronize()
        else:
            self.module.synchronize(device)

    def max_memory_allocated(self, device=None) -> Optional[int]:
        fn = getattr(self.module, "max_memory_allocated", None)
        return None if fn is None else int(fn() if device is None else fn(device))

    def reset_peak_memory_stats(self, device=None) -> None:
        fn = getattr(self.module, "reset_peak_memory_stats", None)
        if fn is not None:
            fn() if device is None else fn(device)

    def manual_seed_all(self, seed: int) -> None:
        fn = getattr(self.module, "manual_seed_all", None)
        if fn is not None:
            fn(seed)


_CPU_API = _CPUDeviceAPI()


def get_device_api(device: DeviceLike):
    """Runtime API object for a device type or device spec.

    For "npu" this imports torch_npu (see :func:`import_torch_npu`); for "cuda" it wraps ``torch.cuda``;
    for "cpu" it returns no-op implementations.
    """
    dtype = device if device in SUPPORTED_DEVICE_TYPES else device_type_of(device)
    if dtype == "cpu":
        return _CPU_API
    if dtype == "cuda":
        return _ModuleDeviceAPI("cuda", torch.cuda)
    return _ModuleDeviceAPI("npu", import_torch_npu().npu)


def check_device_available(device: DeviceLike, num_local_workers: int = 1) -> None:
    """Raise a :class:`DeviceError` unless ``device`` can host ``num_local_workers`` worker processes.

    Checks that the device type is present (cuda/npu), that an explicit index exists, and that there are
    at least as many visible devices as local workers (one device per worker).
    """
    dtype, index = parse_device(device)
    if dtype == "cpu":
        return
    api = get_device_api(dtype)
    visible = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}[dtype]
    if not api.is_available():
        if dtype == "cuda":
            built = torch.version.cuda
            why = (
                f"this torch build has no CUDA support ({torch.__version__})"
                if not built
                else f"no CUDA GPU is visible (torch built with CUDA {built}; {visible}="
                f"{os.environ.get(visible, '<unset>')}; check the NVIDIA driver with nvidia-smi)"
            )
        else:
            why = (
                f"torch_npu reports no usable NPU ({visible}={os.environ.get(visible, '<unset>')}; check the "
                "driver with npu-smi info and that CANN's set_env.sh was sourced)"
            )
        raise DeviceError(
            f"MODEL.DEVICE={str(device)!r} requested, but {dtype} is not available: {why}. "
            "Set MODEL.DEVICE to a device this machine has (e.g. MODEL.DEVICE cpu)."
        )
    count = api.device_count()
    if index is not None and index >= count:
        raise DeviceError(
            f"MODEL.DEVICE={str(device)!r} requested, but only {count} {dtype} device(s) are visible "
            f"(indices 0..{count - 1}; {visible}={os.environ.get(visible, '<unset>')})."
        )
    if index is not None and num_local_workers > 1:
        raise DeviceError(
            f"MODEL.DEVICE={str(device)!r} names one device, but {num_local_workers} worker processes per machine "
            f"were requested. Use MODEL.DEVICE {dtype} (each worker takes the device of its local rank) and "
            f"select devices with {visible}."
        )
    if num_local_workers > count:
        raise DeviceError(
            f"{num_local_workers} worker processes per machine requested on {dtype}, but only {count} {dtype} "
            f"device(s) are visible ({visible}={os.environ.get(visible, '<unset>')}). Use --num-gpus <= {count} "
            "(one process per device)."
        )


def resolve_device(spec: DeviceLike) -> torch.device:
    """Validate ``MODEL.DEVICE`` and return it as a ``torch.device``.

    Imports torch_npu first for npu devices (``torch.device("npu")`` only parses after that import) and
    raises a :class:`DeviceError` when the device is unknown or unavailable.
    """
    dtype, index = parse_device(spec)
    check_device_available(spec)
    try:
        return torch.device(dtype) if index is None else torch.device(dtype, index)
    except RuntimeError as e:  # "npu" unknown to torch: torch_npu imported but did not register it
        raise DeviceError(
            f"MODEL.DEVICE={str(spec)!r}: torch does not know the device type {dtype!r} ({e}). "
            + (_NPU_INSTALL_HINT.format(torch=torch.__version__) if dtype == "npu" else "")
        ) from e


# ---------------------------------------------------------------------------------------------- wrappers


def is_available(device: DeviceLike) -> bool:
    """Whether the device type can be used (never raises for known types; False if torch_npu is missing)."""
    try:
        return get_device_api(device).is_available()
    except DeviceError:
        return False


def device_count(device: DeviceLike) -> int:
    """Number of visible devices of that type (cpu: number of CPU cores)."""
    return get_device_api(device).device_count()


def set_device(device: DeviceLike, index: Optional[int] = None) -> None:
    """Make ``index`` (default: the spec's index) the current device of its type; no-op on CPU."""
    dtype, spec_index = parse_device(device)
    index = spec_index if index is None else index
    if dtype != "cpu" and index is not None:
        get_device_api(dtype).set_device(index)


def current_device(device: DeviceLike) -> Optional[int]:
    """Index of the current device of that type (None on CPU)."""
    return get_device_api(device).current_device()


def synchronize(device: DeviceLike) -> None:
    """Wait for all queued work on the current device of that type (no-op on CPU)."""
    get_device_api(device).synchronize()


def max_memory_allocated(device: DeviceLike) -> Optional[int]:
    """Peak allocated device memory in bytes since the last reset (None on CPU)."""
    return get_device_api(device).max_memory_allocated()


def reset_peak_memory_stats(device: DeviceLike) -> None:
    """Reset the peak-memory counter of the current device (no-op on CPU)."""
    get_device_api(device).reset_peak_memory_stats()


def manual_seed_all(device: DeviceLike, seed: int) -> None:
    """Seed the RNGs of every device of that type (``torch.manual_seed`` already covers CPU)."""
    get_device_api(device).manual_seed_all(seed)


# ---------------------------------------------------------------------------------------------- NPU runtime


def apply_npu_env_defaults(env_list) -> dict:
    """Set ``KEY=VALUE`` entries of ``NPU.ENV`` in ``os.environ`` unless the key is already set.

    Returns:
        dict of the keys this call actually set.
    """
    applied = {}
    for item in env_list or []:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"NPU.ENV entries must be 'KEY=VALUE' strings, got {item!r}")
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def apply_device_runtime(cfg) -> None:
    """Apply per-worker runtime settings of ``MODEL.DEVICE`` from the ``NPU.*`` keys (:func:`apply_npu_runtime`).
    Call it in every worker."""
    apply_npu_runtime(cfg.MODEL.DEVICE, cfg.NPU.ENV, cfg.NPU.JIT_COMPILE, cfg.NPU.ALLOW_HF32)


def apply_npu_runtime(device: DeviceLike, env=(), jit_compile: bool = False, allow_hf32: bool = True) -> None:
    """Per-worker runtime settings of an NPU; nothing is done (and torch_npu is not imported) for cuda and cpu.

    For npu: the ``env`` defaults (``KEY=VALUE``, only keys not already in the environment), then
    ``torch_npu.npu.set_compile_mode(jit_compile=jit_compile)`` and ``torch.npu.{conv,matmul}.allow_hf32``.
    """
    if device_type_of(device) != "npu":
        return
    applied = apply_npu_env_defaults(env)
    if applied:
        logger.info(f"NPU.ENV defaults applied: {applied}")
    torch_npu = import_torch_npu()
    npu = torch_npu.npu
    if hasattr(npu, "set_compile_mode"):
        npu.set_compile_mode(jit_compile=bool(jit_compile))
    else:  # pragma: no cover - very old torch_npu
        logger.warning("torch_npu.npu.set_compile_mode is missing; NPU.JIT_COMPILE is ignored")
    for sub in ("conv", "matmul"):
        mod = getattr(npu, sub, None)
        if mod is not None and hasattr(mod, "allow_hf32"):
            mod.allow_hf32 = bool(allow_hf32)
    logger.info(f"NPU runtime: jit_compile={bool(jit_compile)}, allow_hf32={bool(allow_hf32)}")
