"""fastrelay: a Pusher-protocol real-time event relay with a compiled hot path."""

__version__ = "0.1.0"
