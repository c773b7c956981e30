"""ingestd: an MQTT-native ingestion daemon for farm sensor fleets."""

__version__ = "0.1.0"
__all__ = ["__version__"]
