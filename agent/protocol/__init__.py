"""Pure protocol code: cryptography and wire formats, no I/O.

Modules:
- ``gaen``: Exposure Notification cryptography (TEK, RPIK, RPI, AEMK, AEM).
- ``payload``: the BLE advertisement carrying an RPI and its AEM.
- ``schedule``: when to rotate the RPI / address and the TEK.
- ``export``: the signed Exposure Key Export file.
"""
