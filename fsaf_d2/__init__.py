"""fsaf_d2: FSAF (Feature Selective Anchor-Free, CVPR 2019) as a Detectron2 plugin.

Importing this package registers, in Detectron2's registries:
  * ``META_ARCH_REGISTRY["FSAF"]``            the detector (:class:`fsaf_d2.modeling.FSAF`)
  * ``BACKBONE_REGISTRY["build_fsaf_resnet_fpn_backbone"]``  ResNet+FPN with P6 from C5, P7 from P6
  * a ``torchvision://NAME`` path handler, so ``MODEL.WEIGHTS torchvision://resnet50`` loads
    torchvision's ImageNet weights converted to Detectron2 names
  * the bundled quickstart datasets ``fsaf_quickstart_train`` / ``fsaf_quickstart_val``
"""
__version__ = "0.1.0"

import warnings

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by hand on machines without Detectron2
    raise ImportError(
        "fsaf_d2 needs Detectron2, which has no official PyPI release and is not installed in this "
        "environment. Install it with `bash scripts/setup_env.sh` from the fsaf_d2 repository (it installs "
        "sal-detectron2==0.7.2, upstream Detectron2 main as pure Python), or install upstream Detectron2 "
        "from its git repository: `pip install --no-build-isolation "
        "'git+https://github.com/facebookresearch/detectron2.git'`."
    ) from e

with warnings.catch_warnings():
    # fvcore's losses and Detectron2's box regression are compiled with torch.jit.script when they are
    # imported, which torch 2.14 calls deprecated: two warnings about other packages at the start of every
    # program. Only these imports are silenced; torch.jit.script in the user's own code still warns.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import fvcore.nn  # noqa: E402,F401
    import detectron2.modeling  # noqa: E402,F401

from .config import add_fsaf_config  # noqa: E402
from . import modeling  # noqa: E402,F401  (registers FSAF and its backbone)
from . import data  # noqa: E402,F401  (registers the quickstart datasets)
from .modeling import FSAF, FSAFHead  # noqa: E402
from .weights import register_torchvision_handler  # noqa: E402

register_torchvision_handler()  # MODEL.WEIGHTS torchvision://resnet50

__all__ = ["add_fsaf_config", "FSAF", "FSAFHead", "__version__"]
