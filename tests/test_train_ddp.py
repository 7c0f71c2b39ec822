"""train.py under DistributedDataParallel: two gloo processes on the CPU (torch.multiprocessing
spawn, the environment torchrun would set), DAFormer + CLUDA and HRDA + CLUDA (whose HRDA wrapper
needs DDP's unused-parameter search). Both ranks must end with identical student and teacher
weights and identical (all-reduced) validation metrics, having trained on different data."""
import os
import socket

import torch

import torch.distributed as dist
import torch.multiprocessing as mp

import cluda.data.pairs

from cluda.build import build_model
from cluda.config import load_experiment
from test_train import FAMILIES, tiny_overrides

RUNS = [
    ("daformer_cluda", FAMILIES["daformer_cluda"][0] + ["--train.max_iters=3"]),
    ("hrda_cluda", FAMILIES["hrda_cluda"][0] + ["--train.max_iters=2"]),
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, work_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes share this CPU
    import train

    try:
        for name, overrides in RUNS:
            result = train.main(tiny_overrides(os.path.join(work_dir, name), *overrides))
            torch.save({"student": result["student"].state_dict(),
                        "teacher": result["teacher"].state_dict(),
                        "miou": result["metrics"][19]["mIoU"],
                        "first_batch": list(cluda.data.pairs.IterationBatches(start=0, stop=1, batch_size=2,
                                                                   rank=rank, world=world))[0]},
                       os.path.join(work_dir, f"{name}_rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for name, _ in RUNS:
        r0 = torch.load(tmp_path / f"{name}_rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{name}_rank1.pt", weights_only=True)
        for part in ("student", "teacher"):
            assert r0[part].keys() == r1[part].keys()
            for k in r0[part]:
                assert torch.equal(r0[part][k], r1[part][k]), (name, part, k)
        assert r0["miou"] == r1["miou"]
        assert set(r0["first_batch"]).isdisjoint(r1["first_batch"])  # each rank its own data
        # rank 0 wrote the run's files; the weights moved away from the initial ones
        state = torch.load(tmp_path / name / "run" / "latest.pt", weights_only=True)
        assert all(torch.equal(state["student"][k], r0["student"][k]) for k in r0["student"])
        torch.manual_seed(0)
        init = build_model(load_experiment(None, tiny_overrides(tmp_path, *dict(RUNS)[name]))).state_dict()
        assert any(not torch.equal(init[k], r0["student"][k]) for k in init if init[k].is_floating_point())
