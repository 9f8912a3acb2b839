"""The booking service: an HTTP API that takes bookings for the three backends and says where each one is.

``create_app(config)`` builds the FastAPI app; ``labkit serve`` runs it with its own worker processes.
"""

from labkit.service.app import create_app

__all__ = ["create_app"]
