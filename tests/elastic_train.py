"""A DDP training script as people write them, run by torchrun (tests/test_elastic_torchrun.py).

A small model on the served ``tensor`` dataset (sample i is the row 4i..4i+3), sharded
across the process group. Every ``ckpt_every`` steps it checkpoints the model, the
optimizer and every rank's loader state; started again (by torchrun's restart, or a
new torchrun of another size) it resumes from that checkpoint. Each step's samples
and every rank's batch size go to a log per run, restart and rank, for the test to
check. ``kill_at``: at that step the last rank kills itself (-9), once.

    torchrun --nproc_per_node=N elastic_train.py ADDRESS OUT_DIR RUN KILL_AT CKPT_EVERY EPOCHS
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from batchferry.client import DataLoader

address, out, run = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
kill_at, ckpt_every, epochs = (int(a) for a in sys.argv[4:7])
restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

# Each restart's group keys under a prefix of its own in torchrun's store: gloo's keys from
# the group that died would otherwise send the new group to addresses no one listens on.
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
store = dist.PrefixStore(f"restart{restart}", agent_store)
dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
torch.manual_seed(0)
model = DistributedDataParallel(torch.nn.Linear(4, 5))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
loader = DataLoader(address, "tensor", 3, shuffle=True, seed=7, mode="sharded", job="elastic", timeout=60)
checkpoint = out / "checkpoint.pt"
step = 0
if checkpoint.exists():
    saved = torch.load(checkpoint, weights_only=False)
    model.module.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    loader.load_state_dict(saved["loader"])  # every rank's state: the loader merges them
    step = saved["step"]

with open(out / f"{run}-restart{restart}-rank{rank}.jsonl", "a") as log:
    while loader.epoch < epochs:
        epoch = loader.epoch
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([len(x)]))
            step += 1
            ids = (x[:, 0] // 4).long().tolist()
            log.write(
                json.dumps({"step": step, "epoch": epoch, "ids": ids, "sizes": [int(s) for s in sizes]})
            )
            log.write("\n")
            log.flush()
            if step % ckpt_every == 0:
                states: list[object] = [None] * world
                dist.all_gather_object(states, loader.state_dict())
                if rank == 0:
                    state = {
                        "model": model.module.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "loader": states,
                        "step": step,
                    }
                    torch.save(state, out / "checkpoint.tmp")
                    os.replace(out / "checkpoint.tmp", checkpoint)
                dist.barrier()
            if step == kill_at and rank == world - 1 and restart == 0:
                os.kill(os.getpid(), signal.SIGKILL)
loader.close()
dist.destroy_process_group()
