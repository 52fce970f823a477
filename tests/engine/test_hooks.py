"""Throughput hook, device metric printer and the run summary printed by scripts/train_*.sh."""
import json
import logging

import pytest
from detectron2.engine import TrainerBase

from fsaf_d2.engine.hooks import DeviceMetricPrinter, ThroughputHook
from fsaf_d2.engine.summary import format_summary, summarize_run


class _Loop(TrainerBase):
    """A trainer whose steps take no time; the hook's clock is faked."""

    def run_step(self):
        pass


def test_throughput_excludes_warmup_and_reports_per_card_and_total(tmp_path, monkeypatch):
    clock = iter([0.0, 10.0,  # warm-up iteration: 10 s, excluded
                  10.0, 10.5, 10.5, 11.0, 11.0, 11.5])  # three 0.5 s iterations
    monkeypatch.setattr("fsaf_d2.engine.hooks.time.perf_counter", lambda: next(clock))
    synced = []
    monkeypatch.setattr("fsaf_d2.engine.hooks.synchronize", lambda d: synced.append(d))
    hook = ThroughputHook(total_batch_size=16, num_devices=8, warmup_iters=1, device_type="npu",
                          output_dir=str(tmp_path))
    loop = _Loop()
    loop.register_hooks([hook])
    loop.train(0, 4)
    assert synced == ["npu"] * 4  # every step is timed after a device synchronize
    assert hook.summary["images_per_sec"] == pytest.approx(32.0)  # 16 images / 0.5 s
    assert hook.summary["images_per_sec_per_device"] == pytest.approx(4.0)
    assert hook.summary["measured_iters"] == 3
    assert json.load(open(tmp_path / "throughput.json")) == hook.summary
    values = [v for v, _ in loop.storage.history("throughput/images_per_sec").values()]
    assert values == pytest.approx([32.0] * 3)


def test_metric_printer_reports_device_memory(monkeypatch, caplog):
    from detectron2.utils.events import EventStorage

    monkeypatch.setattr("fsaf_d2.engine.hooks.max_memory_allocated", lambda d: 512 * 2**20 if d == "npu" else None)
    with EventStorage(0) as storage, caplog.at_level(logging.INFO, logger="detectron2.utils.events"):
        storage.put_scalars(total_loss=1.5, lr=0.01, time=0.2, data_time=0.01)
        storage.put_scalar("throughput/images_per_sec", 80.0)
        DeviceMetricPrinter(10, "npu").write()
        DeviceMetricPrinter(10, "cpu").write()
    npu_line, cpu_line = [r.getMessage() for r in caplog.records][-2:]
    assert "max_mem: 512M" in npu_line and "images/s: 80.00" in npu_line and "total_loss: 1.5" in npu_line
    assert "max_mem" not in cpu_line


def test_run_summary(tmp_path):
    (tmp_path / "throughput.json").write_text(json.dumps(
        {"images_per_sec": 96.0, "images_per_sec_per_device": 12.0, "num_devices": 8, "device_type": "npu",
         "total_batch_size": 16, "seconds_per_iter": 0.1667, "measured_iters": 480, "warmup_iters": 20}))
    (tmp_path / "metrics.json").write_text(
        json.dumps({"iteration": 9, "total_loss": 1.0}) + "\n" + json.dumps({"iteration": 9, "bbox/AP": 37.4,
                                                                             "bbox/AP50": 56.8}) + "\n")
    (tmp_path / "log.txt").write_text("x copypaste: Task: bbox\nx copypaste: AP,AP50\nx copypaste: 12.0,30.0\n")
    text = format_summary(summarize_run(str(tmp_path)))
    assert "12.00 images/s per npu device (1 card) / 96.00 images/s on 8 cards" in text
    assert "AP: 37.40" in text
    assert "AP: 12.00" in format_summary(summarize_run(str(tmp_path), prefer_log=True))  # --eval-only runs
    assert "not available" in format_summary(summarize_run(str(tmp_path / "missing")))
