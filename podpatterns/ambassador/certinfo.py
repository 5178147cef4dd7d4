"""When a route's certificates expire: those of its PEM files, and those its upstreams
presented (DER).

Only the ``notAfter`` of each certificate is read, with a small DER walk (X.509's
``Certificate -> TBSCertificate -> Validity``), so nothing beyond the standard library is
needed and no private ``ssl`` API is used. Nothing else of a certificate is read, and a
file is shown by its path only.
"""

from __future__ import annotations

import base64
import calendar
import re
import time
from pathlib import Path
from typing import Any

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL)


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at ``at``."""
    tag = der[at]
    length = der[at + 1]
    at += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(der[at : at + n], "big")
        at += n
    if at + length > len(der):
        raise ValueError("truncated DER")
    return tag, at, at + length


def _time(tag: int, raw: bytes) -> float:
    text = raw.decode("ascii").rstrip("Z")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSS, years 1950-2049 (RFC 5280 4.1.2.5.1)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime: YYYYMMDDHHMMSS
        raise ValueError("not a time")
    fields = time.strptime(text[:14], "%Y%m%d%H%M%S")
    return float(calendar.timegm(fields))


def not_after(der: bytes) -> float:
    """The ``notAfter`` of one DER certificate, as Unix seconds.

    Raises:
        ValueError: the bytes are not a certificate this walk understands.
    """
    _, cert, _ = _tlv(der, 0)  # Certificate
    _, at, _ = _tlv(der, cert)  # TBSCertificate
    tag, start, end = _tlv(der, at)
    if tag == 0xA0:  # [0] version
        at = end
        tag, start, end = _tlv(der, at)
    at = end  # serialNumber
    for _ in range(2):  # signature, issuer
        _, _, at = _tlv(der, at)
    tag, start, _ = _tlv(der, at)  # validity
    if tag != 0x30:
        raise ValueError("no validity")
    _, _, after_before = _tlv(der, start)  # notBefore
    tag, vstart, vend = _tlv(der, after_before)  # notAfter
    return _time(tag, der[vstart:vend])


def expiry(path: Path, *, now: float | None = None) -> dict[str, Any]:
    """The soonest ``notAfter`` of the certificates in a PEM file (blocking: a thread).

    Returns:
        ``{"path", "certificates", "not_after", "expires_in"}`` (Unix seconds, and seconds
        from now, negative once expired), or ``{"path", "error"}`` when the file cannot
        be read or holds no certificate this walk understands.
    """
    now = time.time() if now is None else now
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {"path": str(path), "error": exc.strerror or str(exc)}
    stamps = []
    for block in _PEM.findall(data):
        try:
            stamps.append(not_after(base64.b64decode(block)))
        except (ValueError, IndexError, UnicodeDecodeError):
            continue
    if not stamps:
        return {"path": str(path), "error": "no certificate found"}
    soonest = min(stamps)
    return {
        "path": str(path),
        "certificates": len(stamps),
        "not_after": soonest,
        "expires_in": round(soonest - now, 1),
    }


def signature_oid(der: bytes) -> str:
    """The dotted OID of a DER certificate's ``signatureAlgorithm`` (for SCRAM channel
    binding, whose hash follows the certificate's signature hash: RFC 5929 section 4.1).

    Raises:
        ValueError: the bytes are not a certificate this walk understands.
    """
    _, cert, _ = _tlv(der, 0)  # Certificate
    _, _, at = _tlv(der, cert)  # TBSCertificate, skipped
    tag, start, _ = _tlv(der, at)  # signatureAlgorithm: AlgorithmIdentifier
    if tag != 0x30:
        raise ValueError("no signature algorithm")
    tag, ostart, oend = _tlv(der, start)
    if tag != 0x06:
        raise ValueError("no algorithm OID")
    raw = der[ostart:oend]
    if not raw:
        raise ValueError("empty OID")
    parts = [raw[0] // 40, raw[0] % 40] if raw[0] < 80 else [2, raw[0] - 80]
    value = 0
    for byte in raw[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(str(p) for p in parts)
