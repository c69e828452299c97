"""How the DICOM node listens: :class:`ReceiverConfig` and the constants behind its defaults.

Its own module because every other part of the node reads it (the transfer syntaxes offered by
:mod:`corelab.receiver`, the limits enforced by :mod:`corelab.association`) and it depends on
none of them: plain data, no pynetdicom, no database.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from corelab.settings import Settings

# Transfer syntaxes accepted for every storage class; objects are stored as received (no
# transcoding), so what QC reads is what the scanner sent. Lossy JPEG is accepted for Secondary
# Capture-style images; the imaging manual decides whether a PET series may be lossy.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",      # Explicit VR Little Endian
    "1.2.840.10008.1.2",        # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",   # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",      # Explicit VR Big Endian (retired, still sent by old consoles)
    "1.2.840.10008.1.2.4.70",   # JPEG Lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.57",   # JPEG Lossless
    "1.2.840.10008.1.2.5",      # RLE Lossless
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.50",   # JPEG Baseline (lossy)
    "1.2.840.10008.1.2.4.51",   # JPEG Extended (lossy)
    "1.2.840.10008.1.2.4.91",   # JPEG 2000 (lossy)
)

# Association hygiene (see :mod:`corelab.association`). Constants rather than settings: the
# defaults suit every site we know; ReceiverConfig takes other values (tests, benchmarks).
HANDSHAKE_TIMEOUT_S = 5.0
"""Seconds from TCP accept until the A-ASSOCIATE-RQ (and the TLS handshake) must be complete;
also the time-out of each socket read until then and pynetdicom's ACSE/ARTIM timer."""
MAX_ASSOCIATIONS_PER_HOST = 8
"""Concurrent associations from one peer address (the total is ``max_associations``, 16)."""
MAX_HANDSHAKES_PER_HOST = 8
"""Connections of one peer address that have not completed A-ASSOCIATE yet; one more evicts
that address's oldest."""
MAX_HANDSHAKES = 64
"""Such connections in all; one more evicts the oldest of all."""
MAX_ASSOCIATE_RQ_BYTES = 256 * 1024
"""Largest PDU read before an association is established (an A-ASSOCIATE-RQ proposing every
storage class with every transfer syntax is a few tens of KiB); a larger declared length closes
the connection before anything is buffered (pynetdicom would read all of it into memory)."""


@dataclass(frozen=True)
class ReceiverConfig:
    """How the node listens.

    Attributes
    ----------
    ae_title : str
        Our AE title (``CORELAB_AE_TITLE``).
    port : int
        TCP port (``CORELAB_DICOM_PORT``).
    bind_address : str
        Interface to listen on; ``""`` for all.
    max_associations : int
        Concurrent associations; one more is rejected (transient, local limit exceeded).
    stable_s : float
        Seconds without a new object after which a series is complete.
    tick_s : float
        How often the ticker looks for stable series (and polls the inbox).
    tls_cert, tls_key, tls_ca : Path or None
        DICOM TLS: our certificate and key; with a CA, senders must present a certificate it
        signed.
    max_associations_per_host : int
        Concurrent associations from one peer address; one more is rejected (transient, local
        limit exceeded).
    handshake_timeout_s : float
        Seconds a connection has from accept to a complete A-ASSOCIATE-RQ (and TLS handshake);
        also pynetdicom's ACSE/ARTIM time-out.
    max_handshakes_per_host, max_handshakes : int
        Connections still handshaking, per peer address and in all; one more evicts the oldest.
    dimse_timeout_s, network_timeout_s : float
        pynetdicom time-outs; a sender that vanishes mid-series (or stops mid-PDU) is dropped
        after ``network_timeout_s``.
    """

    ae_title: str = "CORELAB"
    port: int = 11112
    bind_address: str = ""
    max_associations: int = 16
    stable_s: float = 60.0
    tick_s: float = 1.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    max_associations_per_host: int = MAX_ASSOCIATIONS_PER_HOST
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    max_handshakes_per_host: int = MAX_HANDSHAKES_PER_HOST
    max_handshakes: int = MAX_HANDSHAKES
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> ReceiverConfig:
        values = {"ae_title": settings.ae_title, "port": settings.dicom_port, "stable_s": settings.series_stable_s}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certfile=str(self.tls_cert), keyfile=str(self.tls_key) if self.tls_key else None)
        if self.tls_ca:
            ctx.load_verify_locations(cafile=str(self.tls_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


__all__ = ["HANDSHAKE_TIMEOUT_S", "MAX_ASSOCIATE_RQ_BYTES", "MAX_ASSOCIATIONS_PER_HOST", "MAX_HANDSHAKES",
           "MAX_HANDSHAKES_PER_HOST", "TRANSFER_SYNTAXES", "ReceiverConfig"]
