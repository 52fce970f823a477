"""MODEL.WEIGHTS torchvision://NAME loads a locally saved torchvision state dict into the backbone."""
import os

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from fsaf_d2.weights.torchvision import torchvision_weights_file
from fsaf_testing import tiny_cfg


def test_torchvision_weights_are_converted_and_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = torchvision_weights_file("resnet18")
    assert path.startswith(str(tmp_path))
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(3)
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), path)

    cfg = tiny_cfg(**{"MODEL.RESNETS.NORM": "FrozenBN"})
    model = build_model(cfg)
    DetectionCheckpointer(model).load("torchvision://resnet18")
    bottom_up = model.backbone.bottom_up
    assert torch.equal(bottom_up.stem.conv1.weight, tv.conv1.weight)
    assert torch.equal(bottom_up.res5[1].conv2.weight, tv.layer4[1].conv2.weight)
    assert torch.equal(bottom_up.res3[0].shortcut.norm.running_var, tv.layer2[0].downsample[1].running_var)
    assert torch.equal(bottom_up.res4[0].conv1.norm.weight, tv.layer3[0].bn1.weight)
    # the conversion is cached next to the source file
    assert os.path.isfile(os.path.join(os.path.dirname(path), "fsaf_d2", os.path.basename(path)[:-4] + "_d2.pkl"))


def test_unknown_torchvision_model_is_a_clear_error():
    with pytest.raises(ValueError, match="no model named"):
        torchvision_weights_file("resnet5000")


@pytest.mark.parametrize("name,file", [
    ("resnet50", "resnet50-0676ba61.pth"),  # IMAGENET1K_V1, as mmdetection's torchvision://resnet50
    ("resnet101", "resnet101-63fe2227.pth"),
    ("resnet18", "resnet18-f37072fd.pth"),
    ("resnext101_64x4d", "resnext101_64x4d-173b62eb.pth"),  # its only weights
    ("resnet50.imagenet1k_v2", "resnet50-11ad3fa6.pth"),
    ("resnet50.default", "resnet50-11ad3fa6.pth"),
])
def test_bare_names_take_the_weights_the_reference_was_trained_from(name, file):
    path, url = torchvision_weights_file(name)
    assert os.path.basename(path) == file and url.endswith("/" + file)


def test_unknown_weights_tag_is_a_clear_error():
    with pytest.raises(ValueError, match="no weights 'imagenet1k_v9'; available: default, imagenet1k_v1, imagenet1k_v2"):
        torchvision_weights_file("resnet50.imagenet1k_v9")
