"""A streams booking worker process: `python -m workers.streams --help`."""

from labkit.worker import main

if __name__ == "__main__":
    main("streams")
