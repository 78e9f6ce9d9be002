"""Exposure engine, sans-I/O: sightings -> encounters (``aggregate``, ``encounter``) and
what was heard each minute (``minutes``), the proximity rule (``rule``: distance, buckets
or the near/far model of ``hmm``, on the one path-loss model of ``pathloss``, with
``calibration``), the rules apps shipped in 2020 for comparison (``baselines``),
diagnosis-key matching (``matching`` + an optional C kernel) and the decisions it leads
to (``engine``), evaluation on recorded data (``evaluate``), and ROBERT's server-side
risk scoring (``robert_rule``)."""
