"""A kafka booking worker process: `python -m workers.kafka --help`."""

from labkit.worker import main

if __name__ == "__main__":
    main("kafka")
