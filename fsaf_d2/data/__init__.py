"""Data: bundled quickstart dataset, input validation, dataset mapper and loaders."""
from .build import build_fsaf_test_loader, build_fsaf_train_loader  # noqa: F401
