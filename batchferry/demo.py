"""``batchferry demo``: an embedded server on a synthetic dataset and a short training loop.

With ``connect`` the loop trains from running servers instead (the example trainer
of the container and Kubernetes set-ups): ``host:port``, several replicas as
``a:port,b:port``, or ``dns:///NAME:PORT``. They must serve ``DEMO_SPEC`` (or any
dataset of 64 float features and labels in [0, 10)) under ``dataset``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from batchferry.client import DataLoader
from batchferry.server import Server

__all__ = ["run_demo"]

FEATURES, CLASSES = 64, 10
DEMO_SPEC = f"synthetic:n=32768,shape={FEATURES},classes={CLASSES},seed=0"


@contextlib.contextmanager
def _source(connect: str | None, spec: str, num_workers: int) -> Iterator[str | list[str]]:
    """The address to train from: ``connect``, or an embedded server's."""
    if connect:
        targets = [t.strip() for t in connect.split(",") if t.strip()]
        print(f"training from {connect}")
        yield targets if len(targets) > 1 else targets[0]
        return
    started = time.perf_counter()
    with Server({"demo": spec}, host="127.0.0.1", port=0, num_workers=num_workers) as server:
        print(
            f"server on {server.address} with {num_workers} worker(s), started in "
            f"{time.perf_counter() - started:.2f}s"
        )
        yield server.address


def run_demo(
    *,
    num_workers: int = 2,
    epochs: int = 3,
    batch_size: int = 256,
    samples: int = 32768,
    device: str | None = None,
    connect: str | None = None,
    dataset: str = "demo",
    security: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train a small classifier for ``epochs`` epochs; print and return throughput figures."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = f"synthetic:n={samples},shape={FEATURES},classes={CLASSES},seed=0"
    with _source(connect, spec, num_workers) as address:
        print(f"training on {dev}")
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, CLASSES)).to(dev)
        optim = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with DataLoader(
            address,
            dataset,
            batch_size=batch_size,
            shuffle=True,
            seed=0,
            pin_memory=True,
            device=dev if dev.type == "cuda" else None,
            **(security or {}),
        ) as loader:
            servers = f"{loader.num_replicas} replicas" if loader.num_replicas > 1 else "one server"
            print(f"batches by {loader.transport} from {servers}")
            seen, waited, total = 0, 0.0, 0.0
            for epoch in range(epochs):
                t0 = time.perf_counter()
                correct = n = 0
                loss_sum = 0.0
                for features, labels in loader:
                    x, y = features.to(dev), labels.to(dev)
                    logits = model(x)
                    loss = nn.functional.cross_entropy(logits, y)
                    optim.zero_grad(set_to_none=True)
                    loss.backward()
                    optim.step()
                    loss_sum += float(loss.detach()) * len(y)
                    correct += int((logits.argmax(1) == y).sum())
                    n += len(y)
                elapsed = time.perf_counter() - t0
                total += elapsed
                seen += n
                window = loader.stats(reset=True)  # this epoch: the loop's wait in iter() and next()
                waited += window.wait_s
                print(
                    f"epoch {epoch}: loss {loss_sum / n:.4f}  accuracy {correct / n:.3f}  "
                    f"{n / elapsed:,.0f} samples/s  data stall {window.stall_share:.1%}"
                )
    figures = {"samples_per_s": seen / total, "data_wait_share": waited / total}
    print(
        f"done: {figures['samples_per_s']:,.0f} samples/s, waiting for data "
        f"{waited:.2f}s of {total:.2f}s ({100 * figures['data_wait_share']:.1f}%)"
    )
    return figures
