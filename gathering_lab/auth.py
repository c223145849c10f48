"""Tokens, roles and scopes: who may connect, publish, read the stats, and see which events.

::

    from gathering_lab.auth import JWTAuth, mint_token

    auth = JWTAuth(secret)                                  # HS256, shared secret
    auth = JWTAuth.from_public_key_file("jwt.pub.pem")      # RS256, verify only
    server = await serve(port=0, auth=auth)
    token = mint_token(secret, "dashboard-1", roles=["subscribe"], circles=[1], ttl="1h")

A token is a JWT whose claims are ``sub`` (the client id), ``exp`` (required),
``roles`` (a subset of :data:`ROLES`) and optional ``circles`` / ``projects`` lists.
:meth:`JWTAuth.verify` turns one into an :class:`Identity` or raises
:class:`~gathering_lab.exceptions.AuthError` whose message is safe to send as a close
reason (it never contains the token).

A :class:`Scope` is what a token may see, enforced by the server whatever filters the
client chooses: with a ``circles`` list, only events whose ``circle_id`` is in it (events
without a circle are not the client's); without one, every circle; likewise projects.

Tokens never reach a log: :class:`RedactTokens` is a :class:`logging.Filter` that the
server and the client install on the loggers that could see one (websockets' connection
loggers print request lines, headers and frames at DEBUG).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from websockets.protocol import Side

from .exceptions import AuthError
from .protocol import id_key

__all__ = [
    "DEFAULT_AUTH_TIMEOUT",
    "EVERYTHING",
    "NOTHING",
    "ROLES",
    "SECRET_ENV",
    "TIME_CLAIMS",
    "Identity",
    "JWTAuth",
    "RedactTokens",
    "Scope",
    "bearer_token",
    "install_redaction",
    "mint_token",
    "parse_duration",
    "redact",
]

#: Every role a token may grant.
ROLES = frozenset({"subscribe", "publish", "admin"})
#: Seconds a client has to authenticate (``auth`` frame) before it is closed with 1008.
DEFAULT_AUTH_TIMEOUT = 3.0
#: Environment variable the CLI reads the HS256 secret from.
SECRET_ENV = "GATHERING_LAB_JWT_SECRET"
#: HS256 secrets shorter than this are refused (RFC 7518 §3.2: at least the hash size).
MIN_SECRET_BYTES = 32
#: Longer tokens are refused without being parsed.
MAX_TOKEN_LENGTH = 8192

_SUB = re.compile(r"^[\w.:@~+-]{1,128}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


# Scopes and identities


def _in(value: Any, allowed: frozenset[Any]) -> bool:
    """True if the id ``value`` is in ``allowed``, by the filters' rule (:func:`protocol.id_key`).

    Exact: ``1`` and ``"1"`` are different circles; ``True`` and ``1.0`` are no ids.
    """
    key = id_key(value)
    return key is not None and key in allowed


@dataclass(frozen=True, slots=True)
class Scope:
    """The circles and projects a token may see; ``None`` means every one."""

    circles: frozenset[Any] | None = None
    projects: frozenset[Any] | None = None

    @property
    def unrestricted(self) -> bool:
        """True if this scope lets every event through."""
        return self.circles is None and self.projects is None

    @property
    def empty(self) -> bool:
        """True if this scope lets no event through (an empty ``circles`` or ``projects``)."""
        return self.circles == frozenset() or self.projects == frozenset()

    def allows_ids(self, circle_id: Any, project_id: Any) -> bool:
        """Return True if an event in this circle and project is inside the scope."""
        if self.circles is not None and not _in(circle_id, self.circles):
            return False
        return self.projects is None or _in(project_id, self.projects)

    def allows(self, event: Any) -> bool:
        """Return True if ``event`` (anything with ``circle_id`` and ``project_id``) is in scope."""
        return self.allows_ids(event.circle_id, event.project_id)

    def to_dict(self) -> dict[str, Any]:
        """Return the scope as JSON-ready lists (``None``: every one)."""
        return {
            "circles": None if self.circles is None else sorted(self.circles, key=_sort_key),
            "projects": None if self.projects is None else sorted(self.projects, key=_sort_key),
        }


def _sort_key(value: Any) -> tuple[int, str]:
    return (0, f"{value:020d}") if isinstance(value, int) else (1, str(value))


#: The scope of a token without ``circles`` or ``projects`` claims.
EVERYTHING = Scope()
#: The scope of a token that may not receive events (no ``subscribe`` role).
NOTHING = Scope(frozenset(), frozenset())


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified token: who (``sub``), what it may do (``roles``), what it may see (``scope``)."""

    sub: str
    roles: frozenset[str]
    scope: Scope = EVERYTHING
    expires_at: float | None = None

    def has_role(self, role: str) -> bool:
        """True if the token grants ``role``."""
        return role in self.roles

    @property
    def receive_scope(self) -> Scope:
        """The events this client receives: its scope, or nothing without ``subscribe``."""
        return self.scope if "subscribe" in self.roles else NOTHING

    def to_dict(self) -> dict[str, Any]:
        """The identity as sent in ``connection.established`` and ``authenticated``."""
        return {"roles": sorted(self.roles), "scope": self.scope.to_dict()}


# Claims


def _check_ids(name: str, value: Any) -> frozenset[Any] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple | set | frozenset):
        raise AuthError(f"invalid token: '{name}' must be a list")
    ids: set[Any] = set()
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | str) or item == "":
            raise AuthError(f"invalid token: '{name}' entries must be integers or strings")
        ids.add(item)
    return frozenset(ids)


def _check_roles(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple | set | frozenset) or not all(
        isinstance(r, str) for r in value
    ):
        raise AuthError("invalid token: 'roles' must be a list of strings")
    unknown = set(value) - ROLES
    if unknown:
        raise AuthError(
            f"invalid token: unknown role(s) {sorted(unknown)}; expected {sorted(ROLES)}"
        )
    return frozenset(value)


#: The claims that hold a time (RFC 7519 "NumericDate": a JSON number of seconds).
TIME_CLAIMS = ("exp", "nbf", "iat")


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """Return claim ``name`` as seconds, None if absent; refuse anything but a finite number.

    PyJWT reads these claims with ``int()``, so it takes ``"9999999999"`` (a string) as a
    time: a token that never expires. A string, a bool, NaN or an infinity is refused here.
    """
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(
            f"invalid token: '{name}' must be a number of seconds, not {type(value).__name__}"
        )
    if not math.isfinite(value):
        raise AuthError(f"invalid token: '{name}' must be a finite number of seconds")
    return float(value)


def identity_from_claims(claims: Mapping[str, Any]) -> Identity:
    """Check decoded claims and return the :class:`Identity` they describe."""
    for name in TIME_CLAIMS:
        _numeric_date(claims, name)
    sub = claims.get("sub")
    if not isinstance(sub, str) or not _SUB.match(sub):
        raise AuthError(
            "invalid token: 'sub' must be 1-128 letters, digits or . _ - : @ ~ + "
            "(it becomes the client id)"
        )
    return Identity(
        sub=sub,
        roles=_check_roles(claims.get("roles")),
        scope=Scope(
            _check_ids("circles", claims.get("circles")),
            _check_ids("projects", claims.get("projects")),
        ),
        expires_at=_numeric_date(claims, "exp"),
    )


# Verifying


def _read_key(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the JWT {what} {str(path)!r}: {exc.strerror}") from None


def _check_secret(secret: Any) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes):
        raise TypeError(f"the JWT secret must be str or bytes, not {type(secret).__name__}")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes for HS256 "
            f"(got {len(secret)}); make one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return secret


class JWTAuth:
    """Verify JWTs: HS256 with a shared ``secret``, or RS256 with a ``public_key`` (PEM).

    ``timeout`` is how long a client may take to authenticate; ``leeway`` the clock
    skew allowed on ``exp``/``nbf``/``iat``; ``audience`` / ``issuer``, when given, are
    required to match the ``aud`` / ``iss`` claims. ``exp`` is always required.
    """

    def __init__(
        self,
        secret: str | bytes | None = None,
        *,
        public_key: str | bytes | None = None,
        timeout: float = DEFAULT_AUTH_TIMEOUT,
        leeway: float = 0.0,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        if (secret is None) == (public_key is None):
            raise ValueError("give exactly one of secret (HS256) or public_key (RS256)")
        if not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if not isinstance(leeway, int | float) or leeway < 0:
            raise ValueError(f"leeway must be a number of seconds >= 0, not {leeway!r}")
        self._key: Any
        if secret is not None:
            self.algorithm = "HS256"
            self._key = _check_secret(secret)
        else:
            self.algorithm = "RS256"
            self._key = _load_public_key(public_key)
        self.timeout = float(timeout)
        self.leeway = float(leeway)
        self.audience = audience
        self.issuer = issuer

    @classmethod
    def from_public_key_file(cls, path: str | Path, **options: Any) -> JWTAuth:
        """RS256: verify with the PEM public key in ``path``."""
        return cls(public_key=_read_key(path, "public key file"), **options)

    def verify(self, token: Any) -> Identity:
        """Return the identity a token proves; raise AuthError (a safe message) if it does not."""
        import jwt

        if not isinstance(token, str) or not token:
            raise AuthError("missing token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("invalid token: too long")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                leeway=self.leeway,
                audience=self.audience,
                issuer=self.issuer,
                # The times are checked below: PyJWT takes "9999999999" (a string) for one.
                options={
                    "require": ["exp", "sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"invalid token: no '{exc.claim}' claim") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(f"invalid token: not signed with {self.algorithm}") from None
        except jwt.InvalidSignatureError:
            raise AuthError("invalid token: bad signature") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise AuthError("invalid token: wrong audience or issuer") from None
        except jwt.PyJWTError:
            # Other messages may quote parts of the token: say nothing more.
            raise AuthError("invalid token") from None
        self._check_times(claims)
        return identity_from_claims(claims)

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        """Refuse a token whose times are not numbers, that expired, or is not valid yet."""
        exp, nbf, iat = (_numeric_date(claims, name) for name in TIME_CLAIMS)
        now = time.time()
        if exp is not None and exp <= now - self.leeway:
            raise AuthError("token expired")
        # As PyJWT does: not before nbf, and not issued in the future.
        if (nbf is not None and nbf > now + self.leeway) or (
            iat is not None and iat > now + self.leeway
        ):
            raise AuthError("token not valid yet")

    def __repr__(self) -> str:  # never show the key; two instances never look alike
        return f"<JWTAuth {self.algorithm} timeout={self.timeout:g} at {id(self):#x}>"


def _load_public_key(key: Any) -> Any:
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes):
        raise TypeError(f"public_key must be PEM text or bytes, not {type(key).__name__}")
    try:
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:  # pragma: no cover - cryptography is a dependency
        raise ValueError("RS256 needs the 'cryptography' package") from None
    try:
        loaded = load_pem_public_key(key)
    except ValueError:
        raise ValueError("public_key is not a PEM public key") from None
    if not isinstance(loaded, RSAPublicKey):
        raise ValueError("public_key must be an RSA public key (RS256)")
    if loaded.key_size < 2048:
        raise ValueError(f"the RSA key has {loaded.key_size} bits; use at least 2048")
    return loaded


# Minting


def parse_duration(value: str | float) -> float:
    """Return seconds from ``3600``, ``"90s"``, ``"15m"``, ``"1h"`` or ``"7d"``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(value) if isinstance(value, str) else None
        if match is None:
            raise ValueError(f"invalid duration {value!r}: e.g. 3600, 90s, 15m, 1h, 7d")
        seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not 0 < seconds < math.inf:
        raise ValueError(f"duration must be positive, not {value!r}")
    return seconds


def mint_token(
    secret: str | bytes | None,
    sub: str,
    roles: Iterable[str] = ("subscribe",),
    *,
    circles: Iterable[Any] | None = None,
    projects: Iterable[Any] | None = None,
    ttl: str | float = 3600,
    private_key: str | bytes | None = None,
    now: float | None = None,
    **claims: Any,
) -> str:
    """Sign a token for ``sub`` with ``roles`` (HS256 with ``secret``, or RS256 with
    ``private_key`` PEM), valid ``ttl`` (seconds or ``"1h"``); for development and tests."""
    import jwt

    if isinstance(roles, str):
        roles = [r.strip() for r in roles.split(",") if r.strip()]
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {
        "sub": sub,
        "roles": sorted(set(roles)),
        "iat": int(issued),
        "exp": int(issued + parse_duration(ttl)),
    }
    if circles is not None:
        payload["circles"] = list(circles)
    if projects is not None:
        payload["projects"] = list(projects)
    payload.update(claims)
    try:
        identity_from_claims(payload)
    except AuthError as exc:
        raise ValueError(str(exc).removeprefix("invalid token: ")) from None
    if (secret is None) == (private_key is None):
        raise ValueError("give exactly one of secret (HS256) or private_key (RS256)")
    if secret is not None:
        return jwt.encode(payload, _check_secret(secret), algorithm="HS256")
    assert private_key is not None
    key = private_key.encode() if isinstance(private_key, str) else private_key
    return jwt.encode(payload, key, algorithm="RS256")


# Bearer headers and logs


def bearer_token(header: str | None) -> str | None:
    """Return the token of an ``Authorization: Bearer <token>`` header value, else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


_REDACTIONS = (
    # &token=... in a query string logged without its "?".
    (re.compile(r"(?i)([&;]token=)[^&;\s'\"#]*"), r"\1<redacted>"),
    # Authorization: <anything>, as websockets logs headers.
    (re.compile(r"(?i)(authorization:\s*)[^\r\n]*"), r"\1<redacted>"),
    (re.compile(r"(?i)(bearer\s+)[^\s'\",]+"), r"\1<redacted>"),
    # "token": "..." in JSON, even cut short by an ellipsis.
    (re.compile(r'(?i)("token"\s*:\s*)"[^"]*"?'), r'\1"<redacted>"'),
    # Anything else shaped like a JWT (header.payload[.signature]).
    (re.compile(r"eyJ[\w-]{2,}\.[\w-]*(\.[\w-]*)?"), "<redacted>"),
)
#: A query string in a request line, URL or header: up to whitespace, a quote or a fragment.
_QUERY = re.compile(r"\?[^\s'\"#]+")
_QUERY_SEPARATOR = re.compile(r"([&;])")


def _query_key(key: str) -> str:
    """The key as a server would read it: percent-decoded (repeatedly), lowercase."""
    for _ in range(3):  # %2574oken -> %74oken -> token
        decoded = unquote_plus(key)
        if decoded == key:
            break
        key = decoded
    return key.lower()


def _redact_query(match: re.Match[str]) -> str:
    parts = _QUERY_SEPARATOR.split(match.group(0)[1:])
    for i in range(0, len(parts), 2):  # even items are key=value, odd ones separators
        key, equals, _ = parts[i].partition("=")
        if equals and "token" in _query_key(key):
            parts[i] = f"{key}=<redacted>"
    return "?" + "".join(parts)


def redact(text: str) -> str:
    """Return ``text`` with anything that looks like a token replaced by ``<redacted>``.

    In a query string, the value of every key that contains ``token`` once
    percent-decoded (``token``, ``TOKEN``, ``%74oken``, ``access_token``) is redacted.
    """
    if "?" in text:
        text = _QUERY.sub(_redact_query, text)
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactTokens(logging.Filter):
    """A logging filter that removes tokens from records (request lines, headers, frames).

    Every WebSocket frame the *client* sends (logged by websockets as ``"< %s"`` on the
    server, ``"> %s"`` on the client) is shown by its opcode and size alone: a token can
    travel in an ``auth`` frame at any time, split over continuation frames that no
    pattern can recognise. Frames the server sends are shown, unless they mention a
    token. Formatted tracebacks are redacted too (websockets quotes a bad request line).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(_is_frame(a) for a in args):
            hide_all = _from_client(record)
            shown = tuple(
                _frame_summary(a) if _is_frame(a) and (hide_all or _mentions_token(a)) else a
                for a in args
            )
            try:
                record.msg = redact(str(record.msg) % shown)
            except (TypeError, ValueError):
                record.msg = "<redacted>"
            record.args = ()
        else:
            try:
                message = record.getMessage()
            except Exception:  # let logging report its own formatting errors
                return True
            redacted = redact(message)
            if redacted != message:
                record.msg = redacted
                record.args = ()
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            redacted = redact(text)
            if redacted != text:  # handlers then print this text, not the exception
                record.exc_text = redacted
                record.exc_info = None
        return True


def _is_frame(value: Any) -> bool:
    return getattr(value, "opcode", None) is not None and isinstance(
        getattr(value, "data", None), bytes | bytearray | memoryview
    )


def _from_client(record: logging.LogRecord) -> bool:
    """True if the frame logged by ``record`` travels from the client to the server."""
    received = str(record.msg).startswith("<")
    try:  # websockets' LoggerAdapter puts (a weak proxy to) the connection on each record
        side = record.websocket.protocol.side  # type: ignore[attr-defined]
    except (AttributeError, ReferenceError):
        return True  # which side logged it is unknown: hide frames both ways
    return received if side == Side.SERVER else not received


def _mentions_token(frame: Any) -> bool:
    payload = bytes(frame.data).lower()
    return b"token" in payload or b"eyj" in payload


def _frame_summary(frame: Any) -> str:
    name = getattr(frame.opcode, "name", "frame")
    size = len(frame.data)
    more = "" if getattr(frame, "fin", True) else ", continued"
    return f"{name} <{size} byte{'' if size == 1 else 's'}{more}>"


_FILTER = RedactTokens()


def install_redaction(*loggers: logging.Logger | logging.LoggerAdapter[Any] | str) -> None:
    """Add the token-redacting filter to these loggers (idempotent)."""
    for item in loggers:
        log = logging.getLogger(item) if isinstance(item, str) else item
        if isinstance(log, logging.LoggerAdapter):
            log = log.logger
        if isinstance(log, logging.Logger) and _FILTER not in log.filters:
            log.addFilter(_FILTER)
