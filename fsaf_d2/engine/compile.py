"""``SOLVER.COMPILE``: the static-shape training step through ``torch.compile``.

With ``INPUT.FIXED_SIZES`` and ``MODEL.FSAF.MAX_GT`` the tensor part of an FSAF training step (backbone, head,
assignment, level selection and losses: :meth:`fsaf_d2.modeling.fsaf.FSAF.static_training_losses`) has one
input shape per fixed size and no host synchronisation, so it compiles to one graph per fixed size with no
graph break (``fullgraph=True``; ``dynamic=False``). The host part (image normalisation and padding, the
ground truth's padding and copy) stays eager, and so does inference.

``SOLVER.COMPILE.MODE``:

* ``default``: Inductor's fused kernels;
* ``max-autotune``: Inductor also benchmarks kernel and matmul choices (long first compile);
* ``reduce-overhead``: Inductor plus CUDA graphs on cuda (the step is replayed with one launch). Other devices
  have no CUDA graphs: Inductor skips them there, and the mode equals ``default``.

On npu the backend is torchair's (``torchair.get_npu_backend()``, shipped with CANN's PyTorch adapter), which
takes no mode: ``default`` only. Every unsupported combination is refused by :func:`check_compile_support`
when the config is built, naming the key and the way forward.
"""
import logging
import os
import shutil
from typing import Optional

import torch
from torch import nn

from ..config import FSAF_VALID_CHOICES, check_choice
from .device import device_type_of

__all__ = ["COMPILE_MODES", "check_compile_support", "compile_static_training_step", "npu_compile_backend"]

logger = logging.getLogger(__name__)

#: accepted values of SOLVER.COMPILE.MODE (torch.compile's modes)
COMPILE_MODES = FSAF_VALID_CHOICES["SOLVER.COMPILE.MODE"]


def check_compile_support(cfg) -> None:
    """Fail early on ``SOLVER.COMPILE`` settings that cannot run; a no-op when it is off."""
    if not cfg.SOLVER.COMPILE.ENABLED:
        return
    mode = check_choice("SOLVER.COMPILE.MODE", cfg.SOLVER.COMPILE.MODE)
    f = cfg.MODEL.FSAF
    if cfg.MODEL.META_ARCHITECTURE != "FSAF":
        raise ValueError(
            f"SOLVER.COMPILE compiles FSAF's static-shape training step; MODEL.META_ARCHITECTURE is "
            f"{cfg.MODEL.META_ARCHITECTURE!r}. Set SOLVER.COMPILE.ENABLED False."
        )
    if not cfg.INPUT.FIXED_SIZES or f.MAX_GT <= 0:
        raise ValueError(
            "SOLVER.COMPILE.ENABLED needs static shapes, or every new image size and object count would compile "
            f"a new graph: set INPUT.FIXED_SIZES (now {list(cfg.INPUT.FIXED_SIZES)}, e.g. [[800, 1344], [1344, 800]] "
            f"for 800 / 1333 resizing) and MODEL.FSAF.MAX_GT > 0 (now {f.MAX_GT}, e.g. 128); see docs/training.md"
            "#compiled-training-step"
        )
    if f.ANCHOR_BASED:
        raise ValueError(
            "SOLVER.COMPILE does not support the combined model (MODEL.FSAF.ANCHOR_BASED True): its anchor-based "
            "branch matches ground truth Instances on the host. Set SOLVER.COMPILE.ENABLED False."
        )
    device_type = device_type_of(cfg.MODEL.DEVICE)
    if device_type == "npu":
        if mode != "default":
            raise ValueError(
                f"SOLVER.COMPILE.MODE {mode!r} is not available on npu: torchair's backend takes no mode; use 'default'."
            )
        npu_compile_backend()  # raises with the installation hint when torchair is missing
    elif device_type == "cpu":
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None and shutil.which("c++") is None:
            raise RuntimeError(
                f"SOLVER.COMPILE on MODEL.DEVICE cpu needs a C++ compiler for Inductor's CPU kernels; {compiler!r} "
                "was not found. Install one (e.g. apt-get install g++, or set CXX), or set SOLVER.COMPILE.ENABLED False."
            )


def npu_compile_backend():
    """torchair's ``torch.compile`` backend for Ascend NPUs; a clear error when torchair is not installed."""
    try:
        import torchair  # noqa: F401  (npu path only)
        from torchair.configs.compiler_config import CompilerConfig
    except ImportError as e:
        raise RuntimeError(
            "SOLVER.COMPILE on MODEL.DEVICE npu needs torchair, the torch.compile backend of Ascend's PyTorch "
            "adapter (installed with torch_npu from CANN 8 on; `import torchair` failed: "
            f"{e}). Install it for your torch_npu version, or set SOLVER.COMPILE.ENABLED False."
        ) from e
    return torchair.get_npu_backend(compiler_config=CompilerConfig())


def compile_static_training_step(model: nn.Module, mode: str, device_type: str, backend: Optional[str] = None) -> None:
    """Replace ``model.static_training_losses`` by its compiled version (in place, before DDP wrapping).

    Args:
        model: an FSAF model with static shapes (``model.has_static_training_step``).
        mode: one of :data:`COMPILE_MODES`.
        device_type: "cpu", "cuda" or "npu" (the backend: torchair's on npu, else Inductor).
        backend: a ``torch.compile`` backend name that overrides the device's (tests use "aot_eager").
    """
    if not getattr(model, "has_static_training_step", False):
        raise ValueError("compile_static_training_step needs an FSAF model with INPUT.FIXED_SIZES and MODEL.FSAF.MAX_GT")
    check_choice("SOLVER.COMPILE.MODE", mode)
    kwargs = {"fullgraph": True, "dynamic": False}
    if backend is not None:
        kwargs["backend"] = backend
    elif device_type == "npu":
        kwargs["backend"] = npu_compile_backend()
    else:
        kwargs["mode"] = None if mode == "default" else mode
    # every fixed size is one graph; the cache must hold them all (torch's limit is 8 per code object)
    limit = len(model.fixed_sizes) + 1
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit
    model.static_training_losses = torch.compile(model.static_training_losses, **kwargs)
    logger.info(
        f"SOLVER.COMPILE: static training step compiled lazily ({kwargs.get('backend', 'inductor')}, mode {mode}); "
        f"one graph per fixed size {model.fixed_sizes}"
    )
