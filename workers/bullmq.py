"""A bullmq booking worker process: `python -m workers.bullmq --help`."""

from labkit.worker import main

if __name__ == "__main__":
    main("bullmq")
