"""Passwords out of messages: a MongoDB URI is shown with its password as ``***`` wherever the library prints it.

Works on malformed URIs too (a wrong scheme, an unescaped ``@`` or ``/`` in the password), since those are the
ones an error message quotes: when in doubt, more is masked rather than less.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"
#: URI options whose values are secrets (matched without regard to case, as MongoDB reads option names).
SECRET_OPTIONS = ("tlscertificatekeyfilepassword", "authmechanismproperties")


def _split(uri: str) -> tuple[str, str, str] | None:
    """(before the password, the password, from the ``@`` on), or None when the URI names no password.

    The userinfo ends at the last ``@`` (as pymongo reads it), looked for in the whole rest of the URI rather than
    before the first ``/``: a password with an unescaped ``/`` must not escape the mask."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        scheme, rest = "", uri
    at = rest.rfind("@")
    colon = rest.find(":", 0, at) if at > 0 else -1
    if colon < 0:
        return None
    head = f"{scheme}{sep}{rest[: colon + 1]}"
    return head, rest[colon + 1 : at], rest[at:]


def _secret_options(text: str) -> str:
    """``text`` with the values of secret URI options (a key file's password, AWS session tokens) masked."""
    pattern = "|".join(SECRET_OPTIONS)
    return re.sub(rf"(?i)((?:^|[?&;]){pattern})=[^&;#\s]*", rf"\1={MASK}", text)


def redact_uri(uri: str) -> str:
    """``uri`` with its password and secret options replaced by ``***`` (``mongodb://admin:***@host/``)."""
    parts = _split(str(uri))
    if parts is None or not parts[1]:
        return _secret_options(str(uri))
    return _secret_options(f"{parts[0]}{MASK}{parts[2]}")


def scrub(text: str, uri: str) -> str:
    """``text`` (a driver's message about ``uri``) with the URI's password masked wherever it appears, as given
    and percent-decoded."""
    secrets = set()
    parts = _split(str(uri))
    if parts is not None and parts[1]:
        secrets |= {parts[1], unquote(parts[1])}
    for match in re.finditer(rf"(?i)(?:^|[?&;])(?:{'|'.join(SECRET_OPTIONS)})=([^&;#\s]*)", str(uri)):
        secrets |= {match.group(1), unquote(match.group(1))}
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return text
