#!/usr/bin/env python
"""Submit ``train_net.py`` to Slurm with submitit: N nodes x M devices, requeued and resumed on preemption.

    python tools/submit_slurm.py --config-file configs/fsaf_R50_FPN_1x.yaml \\
        --num-machines 2 --num-gpus 8 --partition gpu --timeout 4320
    python tools/submit_slurm.py --config-file ... --num-gpus 8 --slurm gres=npu:8 MODEL.DEVICE npu

``--num-machines`` nodes run ``--num-gpus`` tasks each, one per device; every task runs ``train_net.py``'s
``main``. Takes ``train_net.py``'s own options (``--resume``, ``--eval-only``, ``KEY VALUE`` overrides) plus
the job's; submitit's logs go to ``--job-dir`` (default ``OUTPUT_DIR/submitit``). See docs/clusters.md.
"""
import argparse
import importlib.util
import os
import sys

import fsaf_d2  # noqa: F401  (first: registers FSAF, and Detectron2's import-time warnings stay quiet)
from detectron2.engine import default_argument_parser

def build_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser(__doc__)
    job = parser.add_argument_group("job (submitit)")
    job.add_argument("--job-dir", default="", help="submitit's logs and pickles (default: OUTPUT_DIR/submitit)")
    job.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                     help="default: slurm when sbatch is available, else local (this machine)")
    job.add_argument("--partition", default="", help="Slurm partition")
    job.add_argument("--timeout", type=int, default=4320, help="time limit of one start, minutes")
    job.add_argument("--cpus-per-task", type=int, default=10, help="CPUs per device (data loading)")
    job.add_argument("--mem-gb", type=int, default=0, help="memory per node, GB (0: the partition's default)")
    job.add_argument("--max-timeouts", type=int, default=3, help="requeues after hitting --timeout")
    job.add_argument("--name", default="fsaf_d2", help="job name")
    job.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                     help="more sbatch options by submitit's name, e.g. account=ABC, qos=high, gres=npu:8")
    job.add_argument("--train-net", default="",
                     help="a train_net.py of your own whose main() runs (default: fsaf_d2.train_net's, the package's)")
    job.add_argument("--wait", action="store_true", help="wait for the job and print rank 0's result")
    return parser


def parse_key_values(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--slurm expects KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = value
    return out


def load_train_net_main(path: str):
    """``main`` of ``train_net.py`` at ``path``, pickled by value so that the job needs no import path to it;
    with no path, the package's :func:`fsaf_d2.train_net.main` (what the repository's train_net.py runs)."""
    import cloudpickle

    if not path:
        from fsaf_d2.train_net import main as packaged_main

        return packaged_main
    if not os.path.isfile(path):
        raise SystemExit(f"train_net.py not found at {path}: pass --train-net /path/to/train_net.py")
    spec = importlib.util.spec_from_file_location("train_net", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_net"] = module
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)
    return module.main


def submit(args):
    """Check the config, submit the job; returns the submitit job."""
    from fsaf_d2.engine.cluster import TrainingJob, build_executor
    from fsaf_d2.engine.trainer import config_from_args, pre_launch

    device_type = pre_launch(args).split(":")[0]  # fails now on a bad config or dataset entry, not in the queue
    job_dir = args.job_dir or os.path.join(config_from_args(args).OUTPUT_DIR, "submitit")
    executor = build_executor(
        os.path.join(job_dir, "%j"),
        nodes=args.num_machines,
        tasks_per_node=args.num_gpus,
        device_type=device_type,
        cluster=args.cluster,
        timeout_min=args.timeout,
        partition=args.partition,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb or None,
        max_num_timeout=args.max_timeouts,
        job_name=args.name,
        slurm_params=parse_key_values(args.slurm),
    )
    job = executor.submit(TrainingJob(load_train_net_main(args.train_net), args))
    print(f"Submitted job {job.job_id} ({executor.cluster}, {args.num_machines} x {args.num_gpus} {device_type}); "
          f"logs: {job.paths.folder}")
    return job


def main(argv=None):
    from fsaf_d2.model_zoo import resolve_config_file

    args = build_parser().parse_args(argv)
    args.config_file = resolve_config_file(args.config_file)  # a path, or a shipped config's name
    job = submit(args)
    if args.wait:
        from fsaf_d2.engine.trainer import config_from_args

        results = job.results()  # one per task; raises with the task's traceback if one failed
        where = results[0] if results[0] is not None else f"see {config_from_args(args).OUTPUT_DIR}"
        print(f"Job {job.job_id} finished: {where}")
    return job


if __name__ == "__main__":
    main()
