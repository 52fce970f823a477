"""SOLVER.COMPILE: the static-shape training step through torch.compile equals the eager step.

The equality tests compile with Inductor, as the option does (a minute or two of C++ compilation on a
2-core CPU, hence ``slow``); they share one graph (same tiny config with COCO's 80 classes, batch and fixed
size, and train_net.py runs with this process's thread count), so Inductor's on-disk cache serves the later
compilations, in this process and in train_net.py's. The graph-count test uses the "eager" backend: what it
counts is Dynamo's tracing, not the kernels.
"""
import copy
import json
import os
import sys

import pytest
import torch
from detectron2.modeling import build_model
from torch._dynamo.utils import counters

import engine_testutils as U
from fsaf_d2.benchmarking import training_input
from fsaf_d2.engine.compile import check_compile_support, compile_static_training_step
from tools_testing import run_side_by_side

pytestmark = pytest.mark.skipif(U.META_ARCH != "FSAF", reason="SOLVER.COMPILE compiles FSAF's training step")

#: one fixed size that holds the tiny data's 64x96 and 96x64 images: one graph for the whole run
STATIC = {"INPUT__FIXED_SIZES": [[96, 96]], "MODEL__FSAF__MAX_GT": 4, "SEED": 7}
COMPILED = dict(STATIC, SOLVER__COMPILE__ENABLED=True)


def _batch():
    return [
        training_input(64, 96, [[10, 10, 40, 50], [50, 5, 90, 60]], [0, 1], seed=0),
        training_input(96, 64, [[4, 20, 60, 90]], [1], seed=1),
    ]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float, what: str):
    """|a - b| <= rel * max|b| elementwise: relative to the tensor's scale (gradients have exact zeros)."""
    scale = b.abs().max().clamp(min=1e-12)
    err = (a - b).abs().max() / scale
    assert err <= rel, f"{what}: max error {err.item():.2e} of the tensor's scale (allowed {rel:g})"


@pytest.mark.slow
def test_compiled_step_gives_eager_losses_and_gradients(tmp_path):
    torch.manual_seed(0)
    eager = build_model(U.tiny_cfg(str(tmp_path), "unused", num_classes=80, **STATIC)).train()
    compiled = copy.deepcopy(eager)
    compile_static_training_step(compiled, "default", "cpu")
    batch = _batch()
    expected, got = eager(batch), compiled(batch)
    assert set(got) == set(expected) == {"loss_fsaf_cls", "loss_fsaf_reg"}
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=0)
    sum(expected.values()).backward()
    sum(got.values()).backward()
    ge, gc = _grads(eager), _grads(compiled)
    assert set(gc) == set(ge) and len(ge) > 40
    for name in ge:
        _assert_close_rel(gc[name], ge[name], 1e-4, name)


@pytest.mark.slow
def test_compiled_training_run_follows_the_eager_run(tmp_path, tiny_dataset):
    """Four iterations of the Trainer (AMP off, global-norm clipping, fused SGD): the same loss terms at every
    iteration and the same weights at the end, to 1e-4 relative."""
    runs = {}
    for name, opts in (("eager", STATIC), ("compiled", COMPILED)):
        cfg = U.tiny_cfg(str(tmp_path / name), tiny_dataset, num_classes=80, SOLVER__MAX_ITER=4, **opts)
        trainer = U.make_trainer(cfg)
        trainer.train()
        history = {k: [v for v, _ in trainer.storage.history(k).values()] for k in ("loss_fsaf_cls", "loss_fsaf_reg")}
        runs[name] = (history, U.model_state(trainer))
    (loss_e, state_e), (loss_c, state_c) = runs["eager"], runs["compiled"]
    for k in loss_e:
        assert len(loss_c[k]) == len(loss_e[k]) == 4
        torch.testing.assert_close(torch.tensor(loss_c[k]), torch.tensor(loss_e[k]), rtol=1e-4, atol=0)
    for k, v in state_e.items():
        if v.is_floating_point():
            _assert_close_rel(state_c[k], v, 1e-4, k)


@pytest.mark.slow
def test_train_net_trains_with_the_compiled_step(tmp_path):
    """``train_net.py ... SOLVER.COMPILE.ENABLED True`` in a fresh process logs the compilation and reaches the
    eager run's losses."""
    coco = U.write_builtin_coco_layout(str(tmp_path / "datasets"), num_train=4, num_val=2)
    # this process's thread count: Inductor's C++ kernels are built for a thread count, which is part of the
    # cache key, so the child then reuses the kernels compiled by the tests above
    env = U.subprocess_env(DETECTRON2_DATASETS=coco, OMP_NUM_THREADS=torch.get_num_threads())
    commands = {}
    for name, opts in (("eager", STATIC), ("compiled", COMPILED)):
        yaml = U.opts_to_yaml(U.tiny_opts(str(tmp_path / name), "coco_2017_train", "", 80, **opts),
                              str(tmp_path / f"{name}.yaml"))
        commands[name] = [sys.executable, U.TRAIN_NET, "--config-file", yaml]
    # both at once: Dynamo traces on one core
    procs = dict(zip(commands, run_side_by_side(commands.values(), cwd=str(tmp_path), env=env, timeout=900)))
    losses = {}
    for name, proc in procs.items():
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        out = str(tmp_path / name)
        log = open(os.path.join(out, "log.txt")).read()
        assert ("SOLVER.COMPILE: static training step compiled" in log) == (name == "compiled")
        metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
        losses[name] = [m for m in metrics if "total_loss" in m][-1]
    for k in ("loss_fsaf_cls", "loss_fsaf_reg", "total_loss"):
        assert losses["compiled"][k] == pytest.approx(losses["eager"][k], rel=1e-4), k


def test_one_graph_per_fixed_size_without_graph_breaks(tmp_path):
    """Images of any size inside a fixed size reuse its graph; a second fixed size adds one graph. fullgraph=True
    makes any graph break an error."""
    model = build_model(U.tiny_cfg(str(tmp_path), "unused", INPUT__FIXED_SIZES=[[96, 96], [64, 128]],
                                   MODEL__FSAF__MAX_GT=4)).train()
    torch._dynamo.reset()
    counters.clear()
    compile_static_training_step(model, "default", "cpu", backend="eager")
    sizes = [[(64, 96), (96, 64)], [(90, 90), (50, 70)], [(64, 128), (60, 100)], [(96, 96), (96, 96)], [(40, 128)]]
    for k, batch_sizes in enumerate(sizes):
        batch = [training_input(h, w, [[2, 2, 30, 30]] * (1 + i), [0] * (1 + i), seed=k) for i, (h, w) in enumerate(batch_sizes)]
        losses = model(batch)
        sum(losses.values()).backward()
    # (2, 3, 96, 96), (2, 3, 64, 128) and the single image (1, 3, 64, 128): three input shapes, three graphs
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"]


def test_compile_option_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    def cfg(**kw):
        return U.tiny_cfg(str(tmp_path), "unused", SOLVER__COMPILE__ENABLED=True, **kw)

    check_compile_support(U.tiny_cfg(str(tmp_path), "unused"))  # off: nothing to check
    check_compile_support(cfg(**STATIC))
    with pytest.raises(ValueError, match=r"needs static shapes.*INPUT.FIXED_SIZES.*MODEL.FSAF.MAX_GT"):
        check_compile_support(cfg())
    with pytest.raises(ValueError, match=r"MODEL.FSAF.MAX_GT > 0 \(now 0"):
        check_compile_support(cfg(INPUT__FIXED_SIZES=[[96, 96]]))
    with pytest.raises(ValueError, match="combined model"):
        check_compile_support(cfg(MODEL__FSAF__ANCHOR_BASED=True, **STATIC))
    with pytest.raises(ValueError, match="SOLVER.COMPILE.MODE"):
        check_compile_support(cfg(SOLVER__COMPILE__MODE="fast", **STATIC))
    with pytest.raises(ValueError, match="torchair's backend takes no mode"):
        check_compile_support(cfg(MODEL__DEVICE="npu", SOLVER__COMPILE__MODE="reduce-overhead", **STATIC))
    monkeypatch.setitem(sys.modules, "torchair", None)  # not installed
    with pytest.raises(RuntimeError, match="needs torchair"):
        check_compile_support(cfg(MODEL__DEVICE="npu", **STATIC))
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler.*'no-such-compiler'"):
        check_compile_support(cfg(**STATIC))
