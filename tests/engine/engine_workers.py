"""Worker functions started by ``fsaf_d2.engine.launch`` in the engine tests (importable by spawned children).

Each writes ``<out_dir>/rank<R>.json`` with what it observed; the test process asserts on those files.
"""
import json
import os

import torch
import torch.distributed as dist
from detectron2.utils import comm


def _dump(out_dir, result):
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump(result, f)


def gloo_collectives_worker(out_dir):
    """CPU/gloo: local group, Detectron2's object collectives (not patched), tensor fallback, DDP on a CPU module."""
    from fsaf_d2.engine.comm import _all_gather_as_tensors, create_ddp_model, is_patched, patch_detectron2

    patch_detectron2("cpu")
    patch_detectron2("cpu")  # idempotent
    rank = comm.get_rank()
    model = create_ddp_model(torch.nn.Linear(3, 1, bias=False))
    torch.manual_seed(rank)  # different data per rank; DDP must average the gradients
    model(torch.randn(4, 3)).sum().backward()
    grads = comm.all_gather(model.module.weight.grad.tolist())
    _dump(
        out_dir,
        {
            "rank": rank,
            "world_size": comm.get_world_size(),
            "local_rank": comm.get_local_rank(),
            "local_size": comm.get_local_size(),
            "backend": dist.get_backend(),
            "all_gather": comm.all_gather({"rank": rank}),
            "gather": comm.gather(rank * 10, dst=0),
            "tensor_path": _all_gather_as_tensors({"payload": "x" * (100 * (rank + 1))}, device=torch.device("cpu")),
            "ddp_type": type(model).__name__,
            "ddp_device_ids": model.device_ids,
            "ddp_broadcast_buffers": model.broadcast_buffers,
            "grads_equal": grads[0] == grads[1],
            "num_threads": torch.get_num_threads(),
            "patched": is_patched(),
        },
    )


def fake_hccl_eval_worker(out_dir, dataset_json, image_root):
    """Fake NPU/HCCL: stock Detectron2 ``gather`` fails; after ``patch_detectron2`` COCOEvaluator and
    ``SimpleTrainer.write_metrics`` work and see the results of both ranks."""
    import torch_npu  # the fake of tests/engine/fake_npu (already imported by the launcher)
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import SimpleTrainer
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, BoxMode, Instances
    from detectron2.utils.events import EventStorage

    from fsaf_d2.engine.comm import patch_detectron2

    from fsaf_d2.engine.device import resolve_device

    rank = comm.get_rank()
    result = {
        "backend": dist.get_backend(),
        "local_rank": comm.get_local_rank(),
        "rank": rank,
        "device": str(resolve_device("npu")),
        "current_device": torch_npu.npu.current_device(),
    }
    try:
        comm.gather({"rank": rank})
        result["stock_gather"] = "ok"
    except RuntimeError as e:
        result["stock_gather"] = str(e)

    patch_detectron2("npu")
    patch_detectron2("npu")
    torch_npu._record("patched")

    register_coco_instances("fake_hccl_eval", {}, dataset_json, image_root)
    dicts = DatasetCatalog.get("fake_hccl_eval")
    evaluator = COCOEvaluator("fake_hccl_eval", tasks=("bbox",), output_dir=os.path.join(out_dir, f"eval{rank}"))
    evaluator.reset()
    for d in dicts[rank :: comm.get_world_size()]:  # each rank sees half of the images (like InferenceSampler)
        inst = Instances((d["height"], d["width"]))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    res = evaluator.evaluate()
    result["num_local_images"] = len(dicts[rank :: comm.get_world_size()])
    result["AP"] = res["bbox"]["AP"] if res else None

    with EventStorage() as storage:
        SimpleTrainer.write_metrics({"loss_a": torch.tensor(1.0 + rank)}, 0.01, 0)
        latest = storage.latest()  # only the main process logs; a single loss is logged as total_loss
        result["logged_loss"] = latest["total_loss"][0] if "total_loss" in latest else None
    _dump(out_dir, result)


def nonfinite_agreement_worker(out_dir):
    """CPU/gloo, DDP: rank 1 alone gets a NaN input at iteration 2; both ranks must stop at that iteration
    (rank 0 seeing only finite terms of its own) instead of one of them waiting in the next all-reduce."""
    from fsaf_d2.engine.comm import create_ddp_model
    from fsaf_d2.engine.faults import NonFiniteLossError
    from fsaf_d2.engine.train_loop import DeviceTrainer

    rank = comm.get_rank()
    torch.manual_seed(0)
    model = create_ddp_model(torch.nn.Linear(3, 1))
    batches = []
    for i in range(5):
        x = torch.full((2, 3), float(i + rank))
        if rank == 1 and i == 2:
            x[0, 0] = float("nan")
        batches.append(x)

    class Loss(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return {"loss_sq": self.net(x).pow(2).mean()}

    trainer = DeviceTrainer(Loss(model), batches, torch.optim.SGD(model.parameters(), lr=1e-3))
    result = {"rank": rank}
    try:
        trainer.train(0, 5)
    except NonFiniteLossError as e:
        result.update(iteration=trainer.iter, error=str(e))
    _dump(out_dir, result)


def preempted_after_worker(rank, delays):
    """``torch.multiprocessing`` worker: exit with 75 (preempted) after ``delays[rank]`` seconds."""
    import time

    from fsaf_d2.engine.faults import EXIT_PREEMPTED

    time.sleep(delays[rank])
    raise SystemExit(EXIT_PREEMPTED)


def setting_up_worker(rank):
    """``torch.multiprocessing`` worker that is still setting up (no preemption handler yet) for a minute."""
    import time

    time.sleep(60)


def resume_agreement_worker(out_dir, iterations):
    """Each rank checks its resume iteration ``iterations[rank]`` against the others'."""
    from fsaf_d2.engine.checkpoint import check_same_start_iteration

    try:
        check_same_start_iteration(iterations[comm.get_rank()])
        result = "agreed"
    except Exception as e:  # noqa: BLE001 - the test reads the message
        result = f"{type(e).__name__}: {e}"
    _dump(out_dir, result)
