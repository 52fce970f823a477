"""fsaf_d2.model_zoo: the shipped configs by name, their models, and the released weights (downloaded and
converted on first use; offline: an error naming the URL, the cache file and the converter)."""
import os
from urllib.error import URLError

import pytest
import torch
from detectron2.config import CfgNode
from omegaconf import DictConfig

import fsaf_d2
from fsaf_d2 import model_zoo
from fsaf_d2.engine import build_config
from fsaf_d2.model_zoo import model_zoo as zoo_module
from fsaf_d2.weights.mmdet import convert_mmdet_state_dict
from test_convert_mmdet import mmdet_state_dict
from tools_testing import REPO

RELEASED = ["fsaf_R50_FPN_1x", "fsaf_R101_FPN_1x", "fsaf_X101_64x4d_FPN_1x"]


def test_every_shipped_config_is_found_by_name():
    names = model_zoo.list_configs()
    assert names == sorted(
        n for n in os.listdir(os.path.join(REPO, "configs")) if n.endswith((".yaml", ".py")) and not n.startswith("Base-")
    )
    for stem in RELEASED + ["fsaf_retinanet_R50_FPN_1x", "fsaf_retinanet_R101_FPN_1x", "quickstart_R18_FPN"]:
        for ext in (".yaml", ".py"):  # every model as YAML and LazyConfig
            assert os.path.isfile(model_zoo.get_config_file(stem + ext)), stem + ext
    assert model_zoo.get_config_file("fsaf_R50_FPN_1x.yaml") == os.path.join(REPO, "configs", "fsaf_R50_FPN_1x.yaml")
    with pytest.raises(RuntimeError, match=r"fsaf_R5O_FPN_1x.yaml is not a config shipped.*fsaf_R50_FPN_1x.yaml"):
        model_zoo.get_config_file("fsaf_R5O_FPN_1x.yaml")


def test_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
    """The README's ``configs/NAME`` and a bare ``NAME`` reach the shipped file outside the checkout too."""
    monkeypatch.chdir(tmp_path)
    shipped = os.path.join(REPO, "configs", "fsaf_R50_FPN_1x.yaml")
    assert model_zoo.resolve_config_file("configs/fsaf_R50_FPN_1x.yaml") == shipped
    assert model_zoo.resolve_config_file("fsaf_R50_FPN_1x.yaml") == shipped
    (tmp_path / "mine.yaml").write_text('_BASE_: "%s"\n' % shipped)
    assert model_zoo.resolve_config_file("mine.yaml") == "mine.yaml"  # a file wins
    assert build_config("configs/quickstart_R18_FPN.yaml").MODEL.FSAF.NUM_CLASSES == 5
    with pytest.raises(FileNotFoundError, match=r"'configs/nope.yaml' does not exist.*shipped: \[.*fsaf_R50_FPN_1x.py"):
        build_config("configs/nope.yaml")


def test_get_config_builds_yaml_and_lazy_configs_for_a_device():
    cfg = model_zoo.get_config("fsaf_R101_FPN_1x.yaml", device="cpu")
    assert isinstance(cfg, CfgNode) and cfg.is_frozen()
    assert (cfg.MODEL.DEVICE, cfg.MODEL.RESNETS.DEPTH) == ("cpu", 101)
    assert cfg.MODEL.FSAF.MEMORY_FORMAT in ("channels_last", "contiguous")  # device rule applied
    lazy = model_zoo.get_config("fsaf_R101_FPN_1x.py", device="cpu")
    assert isinstance(lazy, DictConfig)
    assert (lazy.train.device, lazy.model.backbone.bottom_up.stages.depth) == ("cpu", 101)
    assert lazy.model.memory_format == cfg.MODEL.FSAF.MEMORY_FORMAT


@pytest.mark.parametrize("name", ["quickstart_R18_FPN.yaml", "quickstart_R18_FPN.py"])
def test_get_returns_the_model_on_the_device(name):
    model = model_zoo.get(name, device="cpu")
    assert isinstance(model, fsaf_d2.FSAF) and model.training
    assert model.num_classes == 5 and model.device == torch.device("cpu")


def test_trained_weights_of_an_unreleased_config_are_refused():
    with pytest.raises(model_zoo.TrainedWeightsUnavailable, match=r"No released weights for quickstart_R18_FPN.yaml.*fsaf_R50_FPN_1x.yaml"):
        model_zoo.get("quickstart_R18_FPN.yaml", trained=True)


def test_offline_download_error_names_the_url_the_cache_file_and_the_converter(tmp_path, monkeypatch):
    monkeypatch.setenv("FSAF_D2_CACHE", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(zoo_module, "download_url_to_file", offline)
    with pytest.raises(model_zoo.TrainedWeightsUnavailable) as info:
        model_zoo.get("fsaf_R50_FPN_1x.yaml", trained=True, device="cpu")
    message = str(info.value)
    url = "https://download.openmmlab.com/mmdetection/v2.0/fsaf/fsaf_r50_fpn_1x_coco/fsaf_r50_fpn_1x_coco-94ccc51f.pth"
    assert url in message and "Temporary failure in name resolution" in message
    assert os.path.join(str(tmp_path), "fsaf_r50_fpn_1x_coco-94ccc51f.pth") in message
    assert "fsaf-convert-mmdet fsaf_r50_fpn_1x_coco-94ccc51f.pth model.pth" in message
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_downloads_are_checked_against_the_hash_in_the_release_name(tmp_path, monkeypatch):
    monkeypatch.setenv("FSAF_D2_CACHE", str(tmp_path))
    calls = []

    def proxy_page(url, dst, hash_prefix=None, **kwargs):
        calls.append(hash_prefix)
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "3c5a9f01...")')

    monkeypatch.setattr(zoo_module, "download_url_to_file", proxy_page)
    with pytest.raises(model_zoo.TrainedWeightsUnavailable, match="invalid hash value"):
        model_zoo.trained_checkpoint("fsaf_R50_FPN_1x.yaml")
    assert calls == ["94ccc51f"] and os.listdir(tmp_path) == []


def test_an_unreadable_cached_release_names_the_file_to_delete(tmp_path, monkeypatch):
    monkeypatch.setenv("FSAF_D2_CACHE", str(tmp_path))
    cached = tmp_path / "fsaf_r50_fpn_1x_coco-94ccc51f.pth"
    cached.write_text("<html>proxy</html>")
    with pytest.raises(model_zoo.TrainedWeightsUnavailable) as info:
        model_zoo.trained_checkpoint("fsaf_R50_FPN_1x.yaml")
    assert f"Delete {cached}" in str(info.value) and "not a readable PyTorch checkpoint" in str(info.value)


def test_released_weights_are_converted_once_and_loaded(tmp_path, monkeypatch):
    """An mmdetection R-50 checkpoint (synthetic, the released file's keys and shapes) put in the cache by hand:
    get(trained=True) converts it once and both the YAML and the LazyConfig model load it."""
    monkeypatch.setenv("FSAF_D2_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo_module, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    mmdet_sd = mmdet_state_dict(50, fpn_channels=256, num_classes=80)
    torch.save({"state_dict": mmdet_sd, "meta": {"mmdet_version": "2.28.2"}},
               tmp_path / "fsaf_r50_fpn_1x_coco-94ccc51f.pth")
    expected, _ = convert_mmdet_state_dict(mmdet_sd)

    model = model_zoo.get("fsaf_R50_FPN_1x.yaml", trained=True, device="cpu")
    converted = tmp_path / "fsaf_r50_fpn_1x_coco-94ccc51f_fsaf_d2.pth"
    assert converted.is_file()
    assert model_zoo.get_config("fsaf_R50_FPN_1x.yaml", trained=True).MODEL.WEIGHTS == str(converted)
    state = model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value.to(state[key].dtype), rtol=0, atol=0, msg=key)

    mtime = converted.stat().st_mtime_ns
    lazy = model_zoo.get("fsaf_R50_FPN_1x.py", trained=True, device="cpu")  # the converted file is reused
    assert converted.stat().st_mtime_ns == mtime
    torch.testing.assert_close(lazy.head.cls_score.bias, model.head.cls_score.bias, rtol=0, atol=0)
