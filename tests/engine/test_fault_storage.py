"""Storage faults: a full disk or a file-size limit while saving, an unwritable OUTPUT_DIR, truncated and
corrupt checkpoints, and checkpoints of another architecture or class count.

The full disk is a real tmpfs mounted small enough for one checkpoint but not two (needs root with
CAP_SYS_ADMIN; skipped otherwise); the file-size limit (RLIMIT_FSIZE: the kernel fails the write with
EFBIG) needs no privilege. Read-only output is a read-only tmpfs mount as root, ``chmod 555`` otherwise.
"""
import contextlib
import logging
import os
import random
import resource
import subprocess


import pytest
import torch

import engine_testutils as U
import fault_testutils as F
from fsaf_d2.engine.checkpoint import AtomicCheckpointer, check_output_dir
from fsaf_d2.engine.faults import CheckpointLoadError, CheckpointMismatchError, CheckpointWriteError, OutputDirError
import fsaf_d2  # noqa: F401  (registers FSAF)
from detectron2.modeling import build_model as d2_build_model


def _cfg(out, dataset, **overrides):
    return U.tiny_cfg(out, dataset, **dict(F.NARROW, **overrides))


@contextlib.contextmanager
def _tmpfs(path, size_bytes, read_only=False):
    """Mount a tmpfs of ``size_bytes`` at ``path`` for the block; pytest.skip where mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()}); the RLIMIT_FSIZE test covers write failures")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=True)


def _checkpoint_size(tmp_path, dataset):
    """Size of a checkpoint written during training (with the optimizer's momentum)."""
    U.make_trainer(_cfg(str(tmp_path / "probe"), dataset, SOLVER__MAX_ITER=1)).train()
    return os.path.getsize(tmp_path / "probe" / "model_final.pth")


def _assert_previous_kept(out, error, previous):
    message = str(error.value)
    assert "model_0000001.pth" in message and "MiB free on" in message and previous in message
    assert F.last_checkpoint(out) == previous and F.temp_files(out) == []
    AtomicCheckpointer(torch.nn.Module(), out, strict=False).load(os.path.join(out, previous))  # still readable


def test_full_disk_stops_naming_the_path_and_keeps_the_previous_checkpoint(tmp_path, tiny_dataset):
    size = _checkpoint_size(tmp_path, tiny_dataset)
    with _tmpfs(str(tmp_path / "small"), int(size * 1.6)) as out:  # one checkpoint fits, a second does not
        trainer = U.make_trainer(_cfg(out, tiny_dataset, SOLVER__CHECKPOINT_PERIOD=1, SOLVER__MAX_ITER=3))
        with pytest.raises(CheckpointWriteError, match="ENOSPC") as error:
            trainer.train()
        assert trainer.iter == 1  # stopped at the failed save
        _assert_previous_kept(out, error, "model_0000000.pth")


def test_file_size_limit_stops_naming_the_path_and_keeps_the_previous_checkpoint(tmp_path, tiny_dataset):
    out = str(tmp_path / "out")
    U.make_trainer(_cfg(out, tiny_dataset, SOLVER__CHECKPOINT_PERIOD=1, SOLVER__MAX_ITER=1)).train()
    assert F.last_checkpoint(out) == "model_final.pth"
    size = os.path.getsize(os.path.join(out, "model_final.pth"))
    trainer = U.make_trainer(_cfg(out, tiny_dataset, SOLVER__CHECKPOINT_PERIOD=1, SOLVER__MAX_ITER=3), resume=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))  # Python ignores SIGXFSZ: writes fail, EFBIG
    try:
        with pytest.raises(CheckpointWriteError, match="EFBIG") as error:
            trainer.train()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    _assert_previous_kept(out, error, "model_final.pth")


def test_unwritable_output_dir_fails_before_the_first_iteration(tmp_path):
    """train_net.py with OUTPUT_DIR under a regular file (ENOTDIR, any user): no iteration runs."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    coco = U.write_builtin_coco_layout(str(tmp_path / "datasets"), num_train=2, num_val=2)
    config = F.write_job_config(str(tmp_path), str(blocker / "out"))
    rc, output = F.run_job(config, env=F.job_env(coco), cwd=str(tmp_path))
    assert rc != 0
    assert f"OutputDirError: [Errno 20] OUTPUT_DIR '{blocker / 'out'}' cannot be written" in output
    assert "MiB free on" in output and "Starting training" not in output


def test_read_only_output_dir_is_refused_by_the_trainer(tmp_path, tiny_dataset):
    read_only = str(tmp_path / "ro")
    if os.geteuid() == 0:
        context = _tmpfs(read_only, 1 << 20, read_only=True)
    else:
        os.makedirs(read_only)
        os.chmod(read_only, 0o555)
        context = contextlib.nullcontext(read_only)
    with context:
        with pytest.raises(OutputDirError, match="cannot be written") as error:
            U.make_trainer(_cfg(os.path.join(read_only, "out"), tiny_dataset))
        assert error.value.errno in (30, 13)  # EROFS (root: read-only mount), EACCES (chmod 555)
        with pytest.raises(OutputDirError):
            check_output_dir(read_only)


# ---------------------------------------------------------------------------------------------- reading


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_corrupt_last_checkpoint_resumes_from_the_previous_readable_one(tmp_path, tiny_dataset, caplog):
    caplog.set_level(logging.INFO, logger="fsaf_d2")  # also when no earlier test configured logging
    out = str(tmp_path / "out")
    U.make_trainer(_cfg(out, tiny_dataset, SOLVER__CHECKPOINT_PERIOD=1, SOLVER__MAX_ITER=3)).train()
    assert F.last_checkpoint(out) == "model_final.pth"
    _truncate(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "model_0000002.pth"), "wb") as f:
        f.write(random.Random(0).randbytes(4096))  # garbage: skipped as well
    resumed = U.make_trainer(_cfg(out, tiny_dataset, SOLVER__CHECKPOINT_PERIOD=1, SOLVER__MAX_ITER=4), resume=True)
    assert resumed.start_iter == 2  # model_0000001.pth: iteration 1
    text = caplog.text
    assert f"Cannot read checkpoint {out}/model_final.pth" in text and f"Skipping {out}/model_0000002.pth" in text
    assert f"Resumed from the previous readable checkpoint {out}/model_0000001.pth instead" in text


@pytest.mark.parametrize(
    "head",
    [
        # PROTO 2, then BINBYTES8 of 2**62 bytes: unpickling it raises MemoryError (CI saw it from random bytes)
        b"\x80\x02\x8e" + (2**62).to_bytes(8, "little"),
        # no header (a protocol-0 pickle naming a module): refused before unpickling, not a ModuleNotFoundError
        b"cno_such_module\nthing\n.",
    ],
    ids=["huge-length", "no-magic"],
)
def test_a_file_that_fails_to_unpickle_in_any_way_is_a_load_error(tmp_path, head):
    path = tmp_path / "model_0000001.pth"
    path.write_bytes(head + random.Random(1).randbytes(256))
    checkpointer = AtomicCheckpointer(torch.nn.Linear(1, 1), save_dir=str(tmp_path))
    with pytest.raises(CheckpointLoadError, match=f"Cannot read checkpoint {path} .*truncated or corrupt"):
        checkpointer.load(str(path))


def test_no_readable_checkpoint_left_is_an_error_naming_the_file(tmp_path, tiny_dataset):
    out = str(tmp_path / "out")
    U.make_trainer(_cfg(out, tiny_dataset, SOLVER__MAX_ITER=1)).train()
    _truncate(os.path.join(out, "model_final.pth"))
    with pytest.raises(CheckpointLoadError, match=rf"(?s)Cannot read checkpoint {out}/model_final.pth.*No other readable"):
        U.make_trainer(_cfg(out, tiny_dataset, SOLVER__MAX_ITER=2), resume=True)


def test_truncated_model_weights_is_an_error_naming_the_file_and_an_older_one(tmp_path, tiny_dataset):
    out = str(tmp_path / "out")
    U.make_trainer(_cfg(out, tiny_dataset, SOLVER__CHECKPOINT_PERIOD=1, SOLVER__MAX_ITER=2)).train()
    weights = os.path.join(out, "model_final.pth")
    _truncate(weights)
    with pytest.raises(CheckpointLoadError, match=rf"Cannot read checkpoint {weights} .*truncated or corrupt.*"
                                                  rf"newest older checkpoint next to it is {out}/model_0000001.pth"):
        U.make_trainer(_cfg(str(tmp_path / "new"), tiny_dataset, MODEL__WEIGHTS=weights))


# ---------------------------------------------------------------------------------------------- mismatch


def _saved_model(tmp_path, **overrides):
    cfg = _cfg(str(tmp_path / "src"), "unused", **overrides)
    model = d2_build_model(cfg)
    AtomicCheckpointer(model, cfg.OUTPUT_DIR).save("model")
    return os.path.join(cfg.OUTPUT_DIR, "model.pth"), model


def test_checkpoint_of_another_class_count_names_the_keys_and_shapes(tmp_path):
    path, source = _saved_model(tmp_path, MODEL__FSAF__NUM_CLASSES=3)
    target = d2_build_model(_cfg(str(tmp_path / "dst"), "unused"))  # 2 classes
    with pytest.raises(CheckpointMismatchError) as error:
        AtomicCheckpointer(target).load(path)
    message = str(error.value)
    assert f"Checkpoint {path} does not fit the model" in message
    assert "2 keys of another shape: head.cls_score.weight: checkpoint (3, 32, 3, 3) vs model (2, 32, 3, 3)" in message
    assert "head.cls_score.bias: checkpoint (3,) vs model (2,)" in message
    assert "MODEL.WEIGHTS_NEW_CLASS_LAYER" in message

    # fine-tuning to the new class count: the class layer keeps its initialisation, the rest is loaded
    initial = target.head.cls_score.weight.detach().clone()
    AtomicCheckpointer(target, new_class_layer=True).load(path)
    assert torch.equal(target.head.cls_score.weight, initial)
    assert torch.equal(target.head.bbox_pred.weight, source.head.bbox_pred.weight)


def test_checkpoint_of_a_deeper_backbone_names_the_unexpected_keys(tmp_path):
    path, _ = _saved_model(tmp_path, MODEL__RESNETS__DEPTH=34)
    target = d2_build_model(_cfg(str(tmp_path / "dst"), "unused"))  # depth 18
    with pytest.raises(CheckpointMismatchError, match=r"keys the model does not have: backbone\.bottom_up\.res2\.2\."):
        AtomicCheckpointer(target, new_class_layer=True).load(path)
    AtomicCheckpointer(target, strict=False).load(path)  # MODEL.WEIGHTS_STRICT False: the fitting keys only
