"""QAT under torchrun: two processes, gloo, DistributedDataParallel, two steps, export from rank 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import torch.distributed  # noqa: E402

WORKER = r"""
import sys
from pathlib import Path
import numpy as np
import torch
import torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_torch import data, small_cnn
import lowbit.torch as lt

dist.init_process_group("gloo")
rank = dist.get_rank()
calib = [torch.from_numpy(data(16, seed=i)) for i in range(2)]
q = lt.prepare_qat(small_cnn(), example_inputs=(calib[0][:1],), calib=calib, weight_bits=4)
model = torch.nn.parallel.DistributedDataParallel(q)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
target = torch.arange(16) % 10
for step in range(2):
    x = torch.from_numpy(data(16, seed=100 + 10 * step + rank))  # each rank its own shard
    loss = torch.nn.functional.cross_entropy(model(x), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
flat = torch.cat([p.detach().reshape(-1) for p in q.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(gathered, flat)
assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
if rank == 0:
    model.eval()
    lt.export_onnx(model, Path(sys.argv[1]) / "ddp.onnx", example_inputs=(calib[0][:1],))
    with torch.no_grad():
        np.save(Path(sys.argv[1]) / "ref.npy", q(torch.from_numpy(data(8, seed=7))).numpy())
dist.barrier()
dist.destroy_process_group()
"""


# Machine-dependent: some torch builds (e.g. for other platforms) ship without torch.distributed; the pinned
# Linux CPU build has it, so this never skips in `make test`.
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_qat_two_processes_two_steps_export(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
        str(Path(__file__).parent),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    from lowbit.runtimes.ort import session
    from test_torch import data

    out = session(str(tmp_path / "ddp.onnx"), mode="kernels").run(None, {"x": data(8, seed=7)})[0]
    ref = np.load(tmp_path / "ref.npy")
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    assert (tmp_path / "ddp.plan.json").is_file()
