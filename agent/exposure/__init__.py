"""Exposure engine, sans-I/O: sightings -> encounters (aggregation), the proximity
rule with calibration, and diagnosis-key matching."""
