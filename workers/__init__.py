"""Runnable booking workers, one module per backend: ``python -m workers.kafka --concurrency 4``.

Each is the same ``labkit worker`` command with its backend fixed, so a notebook, a
terminal and the WorkerPool all start exactly the same process.
"""
