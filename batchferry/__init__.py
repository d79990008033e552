"""batchferry: a gRPC data-loading service for PyTorch training.

``batchferry.server.Server`` owns datasets and worker processes that build batches
in shared memory; ``batchferry.client.DataLoader`` streams them into a training loop.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
