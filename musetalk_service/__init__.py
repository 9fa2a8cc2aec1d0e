"""musetalk-service: an HTTP inference service for MuseTalk 1.5 lip-sync."""

__version__ = "0.1.0"
