"""FSAF model: meta-architecture, head, backbone top block, priors, assignment, losses, inference."""
from .anchor_based import AnchorBasedBranch  # noqa: F401
from .backbone import P6P7TopBlock, build_fsaf_resnet_fpn_backbone, resnet_stages  # noqa: F401
from .box_coder import TBLRBoxCoder  # noqa: F401
from .fsaf import FSAF  # noqa: F401
from .head import FSAFHead  # noqa: F401
from .losses import FSAFLossSettings  # noqa: F401
