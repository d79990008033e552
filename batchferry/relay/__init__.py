"""Receiver processes: a loader's byte streams received outside its interpreter.

:mod:`~batchferry.relay.parent` holds the loader's side (a handle per process),
:mod:`~batchferry.relay.child` is the process itself, and
:mod:`~batchferry.relay.link` is the socket between them. The package loads neither
torch nor the client, so a receiver process starts quickly.
"""
