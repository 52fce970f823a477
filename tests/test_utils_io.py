"""fsaf_d2.utils.io: one local-path rule, atomic writes that leave no temporary file behind."""
import os
import pathlib

import pytest
import torch

from fsaf_d2.utils.io import atomic_torch_save, atomic_write_bytes, is_local


def test_is_local_has_one_rule_for_schemes():
    assert is_local("out/model.pth") and is_local("/abs/dir") and is_local(pathlib.Path("rel"))
    for remote in ("file:///tmp/x", "s3://bucket/x", "https://host/x", "manifold://a/b"):
        assert not is_local(remote), remote
    assert not is_local(None) and not is_local(3)


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_bytes_replaces_and_cleans_up(tmp_path, durable):
    target = tmp_path / "sub" / "a.json"
    atomic_write_bytes(str(target), b"old", durable=durable)
    atomic_write_bytes(str(target), b"new", durable=durable)
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "m.pth"
    atomic_torch_save({"x": 1}, str(target))

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        atomic_torch_save({"x": 2}, str(target))
    monkeypatch.undo()
    assert torch.load(str(target)) == {"x": 1} and os.listdir(tmp_path) == ["m.pth"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_files_get_the_mode_of_a_plain_write(tmp_path, umask):
    """Checkpoints must be readable as torch.save's would be (group jobs, serving under another uid), not
    left with the private mode of the temporary file."""
    old = os.umask(umask)
    try:
        atomic_torch_save({"w": torch.zeros(1)}, str(tmp_path / "model.pth"))
        atomic_write_bytes(str(tmp_path / "last_checkpoint"), b"model.pth")
        torch.save({"w": torch.zeros(1)}, str(tmp_path / "plain.pth"))
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("model.pth", "last_checkpoint", "plain.pth"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
