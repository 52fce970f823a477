"""Helpers shared by every test folder (``import helpers``: pytest puts ``tests/`` on ``sys.path``, as the
directory of the top-level conftest.py).

:func:`make_cfg` is the one config builder of the tests; the folder presets build on it
(``modeling/fsaf_testing.tiny_cfg``, ``data/fsaf_data_helpers.loader_cfg``, ``engine/engine_testutils.tiny_cfg``
and the parity test's ``fsaf_cfg``).
"""
import os
from typing import Sequence

from detectron2.config import get_cfg

from fsaf_d2.config import add_fsaf_config
from fsaf_d2.engine.config import add_engine_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def override_opts(overrides: dict) -> list:
    """``{"A.B": value}`` (or ``A__B=value`` keyword style) as a ``KEY VALUE`` list for ``merge_from_list``."""
    opts = []
    for key, value in overrides.items():
        opts += [key.replace("__", "."), value]
    return opts


def make_cfg(config_file: str = "", opts: Sequence = (), freeze: bool = False, **overrides):
    """A Detectron2 config with fsaf_d2's model and engine keys (no device rules applied: tests choose).

    Args:
        config_file: yaml merged first (a relative path is relative to the repository root); "" for none.
        opts: ``KEY VALUE`` list merged next (``cfg.merge_from_list``).
        freeze: freeze the result.
        overrides: merged last, by ``merge_from_list`` too (unknown keys fail); keys "A.B" or ``A__B``.
    """
    cfg = get_cfg()
    add_fsaf_config(cfg)
    add_engine_config(cfg)
    if config_file:
        cfg.merge_from_file(os.path.join(REPO_ROOT, config_file))
    cfg.merge_from_list(list(opts))
    cfg.merge_from_list(override_opts(overrides))
    if freeze:
        cfg.freeze()
    return cfg
