"""The benchmark harness (``batchferry bench``): batchferry against torch's DataLoader, same run."""
