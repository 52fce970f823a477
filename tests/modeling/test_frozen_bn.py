"""MODEL.FSAF.FOLD_FROZEN_BN: conv + FrozenBatchNorm2d as one convolution computes the same function."""
import copy

import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model

from fsaf_d2.modeling.frozen_bn import FrozenBNFoldedConv2d, fold_frozen_batchnorm

from fsaf_testing import tiny_cfg


def _random_frozen_conv(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    norm = FrozenBatchNorm2d(6)
    norm.weight.copy_(torch.rand(6, generator=g) + 0.5)
    norm.bias.copy_(torch.randn(6, generator=g))
    norm.running_mean.copy_(torch.randn(6, generator=g))
    norm.running_var.copy_(torch.rand(6, generator=g) + 0.1)
    conv = Conv2d(4, 6, 3, padding=1, stride=2, bias=bias, norm=norm, activation=torch.nn.functional.relu)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if bias:
            conv.bias.copy_(torch.randn(6, generator=g))
    return conv


@pytest.mark.parametrize("bias", [False, True])
def test_folded_conv_matches_conv_then_frozen_bn(bias):
    plain = _random_frozen_conv(bias)
    folded = copy.deepcopy(plain)
    assert fold_frozen_batchnorm(folded) == 1 and type(folded) is FrozenBNFoldedConv2d
    assert list(folded.state_dict()) == list(plain.state_dict())  # checkpoints are unchanged

    x = torch.randn(2, 4, 11, 13, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = plain(x), folded(x2)
    assert torch.allclose(y, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(plain.weight.grad, folded.weight.grad, rtol=1e-4, atol=1e-5)
    if bias:
        assert torch.allclose(plain.bias.grad, folded.bias.grad, rtol=1e-4, atol=1e-5)


def test_only_convs_with_frozen_bn_are_folded():
    model = torch.nn.Sequential(
        _random_frozen_conv(False),
        Conv2d(6, 6, 1, norm=torch.nn.BatchNorm2d(6)),  # trainable BN: left alone
        Conv2d(6, 6, 1),  # no norm
    )
    assert fold_frozen_batchnorm(model) == 1
    assert [type(m) for m in model] == [FrozenBNFoldedConv2d, Conv2d, Conv2d]


def _frozen_bn_model(fold: bool):
    torch.manual_seed(0)
    cfg = tiny_cfg(**{"MODEL.RESNETS.NORM": "FrozenBN", "MODEL.FSAF.FOLD_FROZEN_BN": fold})
    model = build_model(cfg)
    # non-trivial frozen statistics (fresh FrozenBN is the identity map)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.25)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def test_model_with_folding_gives_the_same_losses_and_gradients(batch):
    plain = _frozen_bn_model(False)
    folded = _frozen_bn_model(True)
    backbone_convs = [m for m in folded.backbone.modules() if isinstance(m, Conv2d)]
    frozen = [m for m in backbone_convs if isinstance(m.norm, FrozenBatchNorm2d)]
    assert frozen and all(type(m) is FrozenBNFoldedConv2d for m in frozen)
    assert not any(type(m) is FrozenBNFoldedConv2d for m in plain.modules())
    folded.load_state_dict(plain.state_dict())  # same keys: checkpoints load either way

    plain.train()
    folded.train()
    a, b = plain(batch), folded(batch)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4), (k, a[k], b[k])
    sum(a.values()).backward()
    sum(b.values()).backward()
    grads = dict(plain.named_parameters())
    for name, p in folded.named_parameters():
        if grads[name].grad is None:
            assert p.grad is None, name
            continue
        scale = grads[name].grad.abs().max().clamp(min=1e-8)
        assert (p.grad - grads[name].grad).abs().max() <= 1e-3 * scale + 1e-7, name
