"""Pure protocol code: cryptography and wire formats, no I/O, no clock.

- ``gaen``: Exposure Notification cryptography (TEK, RPIK, RPI, AEMK, AEM), the GAEN
  constants and the key record (:class:`~agent.protocol.gaen.TemporaryExposureKey`).
- ``payload``: the BLE advertisement carrying an RPI and its AEM; service-data lookup.
- ``schedule``: when to rotate the RPI / address and the TEK.
- ``export``: the signed Exposure Key Export file and its
  :class:`~agent.protocol.export.DiagnosisKey`.
- ``verification``: the HMAC binding a certificate to the keys a user publishes.
- ``robert``: ROBERT (SKINNY-64/192, EBID/ECC, HELLO, request MACs, ECDH keys, tuples)
  and its constants.
"""
