"""edgewire: an MQTT-first runtime for AI inference on fleets of edge devices."""

__version__ = "0.1.0"
