"""ctagent: a Bluetooth LE contact-tracing device agent."""

__version__ = "0.1.0"
