"""Atomic checkpoints: a crash while saving leaves the previous checkpoint and last_checkpoint intact."""
import os

import numpy as np
import pytest
import torch

from fsaf_d2.engine.checkpoint import AtomicCheckpointer


class _Counter:
    """A checkpointable holding non-tensor state (as trainer/scheduler states do)."""

    def __init__(self):
        self.state = {"count": 0, "history": np.arange(3), "name": "x"}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def _files(d):
    return sorted(os.listdir(d))


def test_save_load_roundtrip_with_non_tensor_state(tmp_path):
    model = torch.nn.Linear(2, 2)
    counter = _Counter()
    counter.state["count"] = 7
    ckpt = AtomicCheckpointer(model, str(tmp_path), counter=counter)
    ckpt.save("model_final", iteration=41)
    assert _files(tmp_path) == ["last_checkpoint", "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"

    model2, counter2 = torch.nn.Linear(2, 2), _Counter()
    extra = AtomicCheckpointer(model2, str(tmp_path), counter=counter2).resume_or_load("", resume=True)
    assert extra["iteration"] == 41  # numpy arrays & ints: needs weights_only=False on torch >= 2.6
    assert counter2.state["count"] == 7 and list(counter2.state["history"]) == [0, 1, 2]
    assert torch.equal(model2.weight, model.weight)


def test_crash_while_writing_the_model_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("model_final")
    good = (tmp_path / "model_final.pth").read_bytes()
    saved_weight = model.weight.detach().clone()

    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint bytes")  # something reaches the disk ...
        raise OSError(28, "No space left on device")  # ... then the writer dies

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_final")
    monkeypatch.setattr(torch, "save", real_save)

    assert (tmp_path / "model_final.pth").read_bytes() == good  # untouched
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert _files(tmp_path) == ["last_checkpoint", "model_final.pth"]  # no temp file left behind
    fresh = torch.nn.Linear(2, 2)
    AtomicCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    assert torch.equal(fresh.weight, saved_weight)  # the previous weights load fine


def test_crash_while_tagging_keeps_last_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001")
    real_replace = os.replace

    def crash_on_tag(src, dst):
        if os.path.basename(dst) == "last_checkpoint":
            raise KeyboardInterrupt  # killed between writing the temp file and renaming it
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_tag)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000003")
    monkeypatch.setattr(os, "replace", real_replace)
    # the new model file is complete, but last_checkpoint still names the previous (complete) one
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert _files(tmp_path) == ["last_checkpoint", "model_0000001.pth", "model_0000003.pth"]
    torch.load(str(tmp_path / "model_0000003.pth"), weights_only=False)


def test_non_main_process_does_not_write(tmp_path):
    AtomicCheckpointer(torch.nn.Linear(1, 1), str(tmp_path), save_to_disk=False).save("model_final")
    assert _files(tmp_path) == []


class _EMAModel(torch.nn.Module):
    """Running scalars as Detectron2's DenseDetector (float attribute) and as a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(1, 1)
        self.head.loss_normalizer = 100.0
        self.loss_normalizer = "exact"  # a string option, not state
        self.register_buffer("loss_normalizer_ema", torch.tensor(100.0), persistent=False)
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1), persistent=False)  # not a running scalar


def test_running_scalars_are_checkpointed_for_resume(tmp_path):
    from fsaf_d2.engine.checkpoint import ModelRunningScalars

    model = _EMAModel()
    model.head.loss_normalizer = 42.5
    model.loss_normalizer_ema.fill_(7.25)
    assert set(ModelRunningScalars(model).state_dict()) == {"head.loss_normalizer", "loss_normalizer_ema"}
    AtomicCheckpointer(model, str(tmp_path), running=ModelRunningScalars(model)).save("model_0000009")

    fresh = _EMAModel()
    ckpt = AtomicCheckpointer(fresh, str(tmp_path), running=ModelRunningScalars(fresh))
    ckpt.resume_or_load(str(tmp_path / "model_0000009.pth"), resume=False)  # MODEL.WEIGHTS-style load
    assert fresh.head.loss_normalizer == 100.0
    ckpt.resume_or_load("", resume=True)
    assert fresh.head.loss_normalizer == 42.5 and fresh.loss_normalizer_ema.item() == 7.25
    assert fresh.loss_normalizer == "exact"
