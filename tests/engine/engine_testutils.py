"""Shared helpers of the engine tests: tiny COCO-format data, a tiny detector config, a fake torch_npu.

Switching the detector of every engine test is one line: ``META_ARCH`` below (or the environment
variable ``FSAF_ENGINE_TEST_ARCH=FSAF``).
"""
import json
import os
import sys
import uuid

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from helpers import REPO_ROOT, make_cfg, override_opts, write_coco_2017, write_tiny_coco  # noqa: F401

#: detector used by the engine tests ("RetinaNet" or "FSAF")
META_ARCH = os.environ.get("FSAF_ENGINE_TEST_ARCH", "FSAF")

TRAIN_NET = os.path.join(REPO_ROOT, "train_net.py")
FAKE_NPU_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_npu")


def arch_opts(num_classes: int):
    """Config opts of a tiny ``META_ARCH`` detector: ResNet-18 + GN, small FPN, one conv per tower."""
    common = [
        "MODEL.WEIGHTS", "",
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.NORM", "GN",  # FrozenBN with random weights diverges
        "MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"],
        "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"],
        "MODEL.FPN.OUT_CHANNELS", 32,
    ]
    if META_ARCH == "RetinaNet":
        return common + [
            "MODEL.META_ARCHITECTURE", "RetinaNet",
            "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
            "MODEL.ANCHOR_GENERATOR.SIZES", [[16], [32], [64], [128], [256]],
            "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0]],
            "MODEL.RETINANET.NUM_CLASSES", num_classes,
            "MODEL.RETINANET.NUM_CONVS", 1,
            "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
        ]
    if META_ARCH == "FSAF":
        return common + [
            "MODEL.META_ARCHITECTURE", "FSAF",
            "MODEL.BACKBONE.NAME", "build_fsaf_resnet_fpn_backbone",
            "MODEL.FSAF.NUM_CLASSES", num_classes,
            "MODEL.FSAF.NUM_CONVS", 1,
            "MODEL.FSAF.HEAD_NORM", "",  # reference head (GN would see 1 value per group on P7)
            "MODEL.FSAF.SCORE_THRESH_TEST", 0.0,
        ]
    raise ValueError(f"unknown META_ARCH {META_ARCH!r}")


def tiny_opts(output_dir: str, train: str, test: str, num_classes: int, **overrides):
    """All opts of a fast CPU run: 64-96 px images, no data-loader workers, 3 iterations, no weights."""
    opts = arch_opts(num_classes) + [
        "MODEL.DEVICE", "cpu",
        "INPUT.FORMAT", "BGR",
        "MODEL.PIXEL_MEAN", [103.53, 116.28, 123.675],
        "MODEL.PIXEL_STD", [1.0, 1.0, 1.0],
        "INPUT.MIN_SIZE_TRAIN", (64,),
        "INPUT.MAX_SIZE_TRAIN", 96,
        "INPUT.MIN_SIZE_TEST", 64,
        "INPUT.MAX_SIZE_TEST", 96,
        "DATASETS.TRAIN", (train,),
        "DATASETS.TEST", (test,) if test else (),
        "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.BASE_LR", 0.01,
        "SOLVER.WARMUP_ITERS", 0,
        "SOLVER.STEPS", (),
        "SOLVER.MAX_ITER", 3,
        "SOLVER.CHECKPOINT_PERIOD", 100,
        "SOLVER.THROUGHPUT_WARMUP_ITERS", 1,
        "SOLVER.CLIP_GRADIENTS.ENABLED", True,
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 10.0,
        "TEST.EVAL_PERIOD", 0,
        "OUTPUT_DIR", output_dir,
    ]
    return opts + override_opts(overrides)


def tiny_cfg(output_dir: str, train: str, test: str = "", num_classes: int = 2, **overrides):
    """A frozen config from :func:`tiny_opts` (``overrides``: ``SOLVER__MAX_ITER=4`` style keys)."""
    return make_cfg(opts=tiny_opts(output_dir, train, test, num_classes, **overrides), freeze=True)


def opts_to_yaml(opts, path: str) -> str:
    """Write ``KEY VALUE`` opts as a complete config yaml (for ``train_net.py --config-file``)."""
    with open(path, "w") as f:
        f.write(make_cfg(opts=opts).dump())
    return path


# ---------------------------------------------------------------------------------------------- data


def register_tiny_coco(root: str, num_images: int = 4, seed: int = 0, prefix: str = "engine_tiny"):
    """Write a 2-class tiny dataset under ``root`` and register it under a unique name.

    Returns:
        the registered dataset name (used for both training and evaluation).
    """
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    json_path = write_tiny_coco(os.path.join(root, "images"), os.path.join(root, "ann.json"), num_images, cats, seed)
    register_coco_instances(name, {}, json_path, os.path.join(root, "images"))
    return name


def unregister(name: str) -> None:
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def write_builtin_coco_layout(root: str, num_train: int = 4, num_val: int = 4) -> str:
    """Tiny data in Detectron2's builtin COCO layout, so ``DETECTRON2_DATASETS=root`` makes
    ``coco_2017_train`` / ``coco_2017_val`` point at it in any (sub)process. Uses the 80 COCO categories.
    """
    write_coco_2017(os.path.join(root, "coco"), "{split}", num_train, num_val)
    return root


# ---------------------------------------------------------------------------------------------- processes


def subprocess_env(**extra):
    """Environment for child python processes: repo importable, quiet warnings, 1 thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def read_events(path: str):
    """Lines of a fake-torch_npu event log (see fake_npu/torch_npu/__init__.py)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def drop_fake_npu_modules():
    """Forget an imported fake torch_npu (the privateuse1 rename done by it stays, as with the real one)."""
    for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
        del sys.modules[name]


def make_trainer(cfg, resume: bool = False, trainer_cls=None):
    """Build a Trainer as train_net.py would in one process: checks, seeding, resume_or_load."""
    from detectron2.utils.env import seed_all_rng

    from fsaf_d2.engine import Trainer
    from fsaf_d2.engine.trainer import check_config

    check_config(cfg)
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else 0)
    trainer = (trainer_cls or Trainer)(cfg)
    trainer.resume_or_load(resume=resume)
    return trainer


def model_state(trainer):
    """CPU copy of the (unwrapped) model's state dict."""
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
