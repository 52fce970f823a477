"""fsaf_d2's configs and released weights, as ``detectron2.model_zoo`` offers Detectron2's.

    from fsaf_d2 import model_zoo
    model_zoo.get_config_file("fsaf_R50_FPN_1x.yaml")         # path of a shipped config
    cfg = model_zoo.get_config("fsaf_R50_FPN_1x.py")          # a LazyConfig (.py) or a CfgNode (.yaml)
    model = model_zoo.get("fsaf_R50_FPN_1x.yaml", trained=True, device="cpu")
"""
from .model_zoo import (  # noqa: F401
    TrainedWeightsUnavailable,
    config_dir,
    get,
    get_checkpoint_url,
    get_config,
    get_config_file,
    list_configs,
    resolve_config_file,
    trained_checkpoint,
)

__all__ = [
    "TrainedWeightsUnavailable",
    "config_dir",
    "get",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "list_configs",
    "resolve_config_file",
    "trained_checkpoint",
]
