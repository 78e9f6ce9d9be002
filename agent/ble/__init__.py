"""Radios behind two small interfaces (``base``): an Advertiser and a Scanner.
``sim`` is the simulated medium used by tests and the demo."""
