"""Launch + collectives: 2 CPU/gloo workers, and 2 workers on a fake NPU whose "hccl" has no gather."""
import json
import os
import threading
import time

import pytest
import torch
from detectron2.utils import comm as d2_comm

import engine_testutils as U
import engine_workers
from fsaf_d2.engine import comm as C
from fsaf_d2.engine.launch import launch, torchrun_env


def _results(out_dir, world):
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]


def _comm_functions():
    return {name: getattr(d2_comm, name) for name in ("all_gather", "gather", "_get_global_gloo_group")}


def test_patch_applies_to_hccl_only_and_is_idempotent_and_reversible():
    from detectron2.evaluation import sem_seg_evaluation

    originals = _comm_functions()
    assert C.needs_patch("npu") and not C.needs_patch("cuda") and not C.needs_patch("cpu")
    for device_type in ("cpu", "cuda"):  # gloo and NCCL gather: Detectron2's collectives stay as they are
        C.patch_detectron2(device_type)
        assert not C.is_patched() and _comm_functions() == originals
    try:
        C.patch_detectron2("npu")
        C.patch_detectron2("npu")
        assert C.is_patched()
        assert d2_comm.gather is C.gather and d2_comm._get_global_gloo_group is C.get_object_group
        assert d2_comm.all_gather is originals["all_gather"]  # HCCL implements all_gather
        assert sem_seg_evaluation.all_gather is originals["all_gather"]  # no other module is touched
        assert d2_comm.all_gather("x") == ["x"] and d2_comm.gather("y") == ["y"]  # world size 1
    finally:
        C.unpatch_detectron2()
    assert _comm_functions() == originals


def test_ddp_device_ids():
    assert C.ddp_device_ids(torch.device("cpu")) is None
    assert C.ddp_device_ids(torch.device("cuda", 1)) == [1]


def test_torchrun_env_parsing(monkeypatch):
    assert torchrun_env() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    env = torchrun_env()
    assert env == {"rank": 3, "local_rank": 1, "world_size": 4, "local_world_size": 2,
                   "master_addr": "10.0.0.1", "master_port": "29500"}


def test_torchrun_env_without_master_address_is_an_error(monkeypatch):
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR/MASTER_PORT"):
        launch(print, 1, device_type="cpu", dist_url=None)


def test_two_cpu_workers_gloo(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the workers then share the cores (docs/devices.md)
    launch(engine_workers.gloo_collectives_worker, 2, dist_url="auto", args=(str(tmp_path),), device_type="cpu")
    r0, r1 = _results(str(tmp_path), 2)
    for r, res in enumerate((r0, r1)):
        assert res["backend"] == "gloo" and res["world_size"] == 2
        assert (res["local_rank"], res["local_size"]) == (r, 2)
        assert res["all_gather"] == [{"rank": 0}, {"rank": 1}]
        assert res["tensor_path"] == [{"payload": "x" * 100}, {"payload": "x" * 200}]
        assert res["ddp_type"] == "DistributedDataParallel" and res["ddp_device_ids"] is None
        assert res["ddp_broadcast_buffers"] is False and res["grads_equal"]
        assert res["num_threads"] == max(1, (os.cpu_count() or 1) // 2)
        assert res["patched"] is False  # gloo: Detectron2's own collectives
    assert r0["gather"] == [0, 10] and r1["gather"] == []


def test_fake_npu_workers_use_hccl_and_never_gather(fake_npu, tmp_path, monkeypatch):
    data = tmp_path / "data"
    cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    ann = U.write_tiny_coco(str(data / "images"), str(data / "ann.json"), 4, cats)
    monkeypatch.setenv("FAKE_NPU_DEVICE_COUNT", "2")
    monkeypatch.setenv("FAKE_NPU_REGISTER_DEVICE", "1")  # in the workers: torch.device("npu") parses
    launch(
        engine_workers.fake_hccl_eval_worker,
        2,
        dist_url="auto",
        args=(str(tmp_path), ann, str(data / "images")),
        device_type="npu",
    )
    r0, r1 = _results(str(tmp_path), 2)
    for r, res in enumerate((r0, r1)):
        assert res["backend"] == "hccl" and res["local_rank"] == r
        assert res["device"] == "npu" and res["current_device"] == r
        # the fake is faithful: stock Detectron2 gather hits ProcessGroupHCCL's missing gather
        assert "does not support gather" in res["stock_gather"]
        assert res["num_local_images"] == 2
    # COCOEvaluator merged both ranks' predictions (perfect boxes -> AP 100 only with all 4 images)
    assert r0["AP"] == pytest.approx(100.0) and r1["AP"] is None
    assert r0["logged_loss"] == pytest.approx(1.5) and r1["logged_loss"] is None  # mean of 1.0 and 2.0

    events = U.read_events(str(tmp_path / "npu_events.jsonl"))
    worker_pids = {e["pid"] for e in events if e["event"] == "init_process_group"}
    assert len(worker_pids) == 2
    for pid in worker_pids:
        mine = [e for e in events if e["pid"] == pid]
        names = [e["event"] for e in mine]
        init = names.index("init_process_group")
        assert mine[init]["backend"] == "hccl"
        assert "set_device" in names[:init], "set_device must precede init_process_group"
        assert {e["index"] for e in mine if e["event"] == "set_device"} == {mine[init]["rank"]}
        assert "gather" not in names[names.index("patched"):], "a gather reached the HCCL backend"


def test_torchrun_env_with_inconsistent_ranks_is_an_error(monkeypatch):
    for k, v in {"RANK": "5", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="Inconsistent distributed environment"):
        launch(print, 1, device_type="cpu")


@pytest.mark.parametrize("failed", [True, False])
def test_peer_watchdog_ends_the_peers_of_a_rank_that_failed(monkeypatch, failed):
    """A rank that stops with an error says so in the store, and its peers end at once (they may be waiting
    in a collective for it); a rank that ends normally is simply no longer watched."""
    from torch.distributed import HashStore

    from fsaf_d2.engine.comm import PeerWatchdog

    store = HashStore()
    lost = []
    monkeypatch.setattr(PeerWatchdog, "_lost", lambda self, why: lost.append((self.rank, why)))
    watchdogs = [PeerWatchdog(store, rank, 2, timeout_s=1).start() for rank in (0, 1)]  # heartbeat every 0.1 s
    watchdogs[1].stop(failed=failed)
    deadline = time.monotonic() + 3  # 3x the silence timeout: a rank that ended normally is not "silent"
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    watchdogs[0].stop()
    if failed:
        assert lost == [(0, "rank 1 stopped with an error (its log names it)")]
    else:
        assert lost == []


class _SlowStore:
    """A HashStore whose writes of heartbeat counters take ``delay`` seconds (only those of the counter
    values ``only``, if given)."""

    def __init__(self, delay, only=None):
        from torch.distributed import HashStore

        self.store, self.delay, self.only = HashStore(), delay, only
        self.writing = threading.Event()
        self.stall_ended = None

    def set(self, key, value):
        if str(value).isdigit() and (self.only is None or str(value) in self.only):
            self.writing.set()
            time.sleep(self.delay)
            self.stall_ended = time.monotonic()
        self.store.set(key, value)

    def get(self, key):
        return self.store.get(key)

    def check(self, keys):
        return self.store.check(keys)


def test_peer_watchdog_final_mark_is_not_overwritten_by_a_beat_in_flight():
    from fsaf_d2.engine.comm import PeerWatchdog

    store = _SlowStore(delay=0.5, only={"1"})  # the thread's first beat
    watchdog = PeerWatchdog(store, 0, 2, timeout_s=60)
    watchdog.interval = 0.05
    watchdog.start()
    assert store.writing.wait(10)  # a beat is being written now
    watchdog.stop(failed=True)
    watchdog._thread.join(10)  # whatever it was writing has landed
    assert store.get("fsaf_d2/heartbeat/0") == b"failed"


def test_peer_watchdog_held_up_itself_does_not_blame_its_peers(monkeypatch):
    """While this rank's watchdog thread could not run (here: a 4 s store write; in practice the GIL held by
    a long JSON parse), it saw nothing of its peers: their silence counts from when it runs again."""
    from fsaf_d2.engine.comm import PeerWatchdog

    store = _SlowStore(delay=4.0, only={"2"})  # the second beat, after the peer was seen at the first
    store.store.set("fsaf_d2/heartbeat/1", "7")  # a peer that never beats again
    lost = []
    monkeypatch.setattr(PeerWatchdog, "_lost", lambda self, why: lost.append(time.monotonic()))
    watchdog = PeerWatchdog(store, 0, 2, timeout_s=3).start()  # checks every 0.3 s
    deadline = time.monotonic() + 20
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    watchdog.stop()
    assert lost, "a silent peer must still be declared lost"
    # a full timeout of silence after the stall, not at once (the stall alone exceeds the timeout)
    assert lost[0] - store.stall_ended >= 2.0


def _signalled_while_setting_up():
    import signal

    os.kill(os.getpid(), signal.SIGTERM)  # e.g. Slurm's, while the COCO annotations load
    time.sleep(5)
    raise AssertionError("the signal did not end the run")


def test_a_preemption_signal_before_training_exits_75_in_one_process():
    """Outside training there is nothing to save, but the exit code must still say "preempted" (75), not
    SIGTERM's 143, so that the scheduler script requeues the job."""
    import signal

    from fsaf_d2.engine.faults import EXIT_PREEMPTED

    with pytest.raises(SystemExit) as stopped:
        launch(_signalled_while_setting_up, 1, device_type="cpu")
    assert stopped.value.code == EXIT_PREEMPTED
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # given back


@pytest.mark.parametrize("iterations", [[6000, 6000], [6000, 4000]])
def test_ranks_resuming_from_different_checkpoints_all_stop(tmp_path, iterations):
    """A rank that could not read the newest checkpoint falls back to an older one; the ranks would then train
    diverging replicas into mismatched collectives. Every rank stops with the same error instead."""
    launch(engine_workers.resume_agreement_worker, 2, dist_url="auto", args=(str(tmp_path), iterations),
           device_type="cpu")
    results = _results(str(tmp_path), 2)
    if iterations[0] == iterations[1]:
        assert results == ["agreed", "agreed"]
    else:
        assert results[0] == results[1]
        assert results[0].startswith("CheckpointLoadError: The ranks would resume from different iterations "
                                     "(rank 0: 6000, rank 1: 4000)")
