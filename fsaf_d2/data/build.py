"""Train/test loaders (placeholder: Detectron2's defaults; the data module replaces this)."""
from detectron2.data import build_detection_test_loader, build_detection_train_loader


def build_fsaf_train_loader(cfg):
    return build_detection_train_loader(cfg)


def build_fsaf_test_loader(cfg, dataset_name):
    return build_detection_test_loader(cfg, dataset_name)
