"""Exposure engine, sans-I/O: sightings -> encounters (``aggregate``, ``encounter``),
the proximity rule (``rule``, on the one path-loss model of ``pathloss``, with
``calibration``), diagnosis-key matching (``matching`` + an optional C kernel) and the
decisions it leads to (``engine``), evaluation on recorded data (``evaluate``), and
ROBERT's server-side risk scoring (``robert_rule``)."""
