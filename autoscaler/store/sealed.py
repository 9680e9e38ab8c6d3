"""Secrets encrypted at rest: :class:`SealedString` (engine keys) and
:class:`SealedText` (stored secrets, ``autoscaler secrets``), AES-256-GCM column types.

A replica's engine key is a bearer secret for its engine, so the ledger cannot keep it
in the clear (a copied ``state.db`` or a database dump would hand out every engine). The
column holds ``enc1:`` + base64url(nonce ‖ ciphertext ‖ tag), 85 characters for a
32-character key, and the ORM seals on write and opens on read, so the code around it
sees plain strings.

The key (32 random bytes, base64url) comes from ``$AUTOSCALER_SECRET_KEY``, or the file
``$AUTOSCALER_SECRET_KEY_FILE``, or, for ``autoscaler run`` and a controller on a SQLite
store, ``DATA_DIR/secret.key`` (made 0600 on first start). Processes sharing PostgreSQL
(roles apart, several ``autoscaler run`` replicas) read it from the environment only and
must be given the same key; one without a key stores new engine keys in the
clear (it says so at start) and reads sealed ones as the sealed text; one with another
key fails with an error naming the variables. Values written before sealing existed
stay readable as they are.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

PREFIX = "enc1:"
KEY_ENV = "AUTOSCALER_SECRET_KEY"
KEY_FILE_ENV = "AUTOSCALER_SECRET_KEY_FILE"
KEY_FILE_NAME = "secret.key"

log = logging.getLogger("autoscaler.store")


class SecretKeyError(RuntimeError):
    """A sealed value cannot be opened: no key, or not the key it was sealed with."""


class Sealer:
    """Seals and opens short strings with one AES-256-GCM key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the secret key must be 32 bytes (base64url of 32 random bytes)")
        self._aead = AESGCM(key)

    def seal(self, text: str) -> str:
        nonce = secrets.token_bytes(12)
        blob = nonce + self._aead.encrypt(nonce, text.encode(), PREFIX.encode())
        return PREFIX + base64.urlsafe_b64encode(blob).decode().rstrip("=")

    def open(self, sealed: str) -> str:
        data = sealed.removeprefix(PREFIX)
        blob = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        try:
            return self._aead.decrypt(blob[:12], blob[12:], PREFIX.encode()).decode()
        except Exception:
            raise SecretKeyError(
                f"a sealed engine key does not open with this key: give every role the "
                f"same ${KEY_ENV} or ${KEY_FILE_ENV}"
            ) from None


_active: Sealer | None = None


def use_key(key: bytes | None) -> None:
    """Seal with ``key`` from now on in this process (``None``: store in the clear)."""
    global _active
    _active = None if key is None else Sealer(key)


def decode_key(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_key(data_dir: Path | None, *, environ: dict[str, str] | None = None) -> bytes | None:
    """The key from the environment, else ``data_dir/secret.key`` (made 0600 when
    missing); ``None`` with neither."""
    env = dict(os.environ) if environ is None else environ
    if env.get(KEY_ENV):
        return decode_key(env[KEY_ENV])
    if env.get(KEY_FILE_ENV):
        return decode_key(Path(env[KEY_FILE_ENV]).read_text())
    if data_dir is None:
        return None
    path = data_dir / KEY_FILE_NAME
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        encoded = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(encoded + "\n")
    return decode_key(path.read_text())


def configure_from_environment(data_dir: Path | None) -> None:
    """:func:`load_key` then :func:`use_key`; warns when engine keys will be stored clear."""
    key = load_key(data_dir)
    if key is None:
        log.warning(
            "engine keys and stored secrets are kept unencrypted: set %s or %s (the same "
            "for every role)",
            KEY_ENV,
            KEY_FILE_ENV,
        )
    use_key(key)


class SealedString(TypeDecorator[str]):
    """A string column sealed with the process's key (see the module docstring)."""

    impl = String(100)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None or _active is None or value.startswith(PREFIX):
            return value
        return _active.seal(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if value is None or not str(value).startswith(PREFIX):
            return value  # type: ignore[no-any-return]
        if _active is None:  # a reader without the key (a script, a test) sees it sealed
            return str(value)
        return _active.open(str(value))


class SealedText(SealedString):
    """:class:`SealedString` for longer values: a stored secret (a Hugging Face token
    today, up to :data:`autoscaler.store.secrets.MAX_SECRET_CHARS`).

    A user's value is sealed whatever it looks like: one that happens to begin with the
    sealed prefix is sealed too, so it is neither stored in the clear nor misread as
    sealed. (A stored secret is only ever written from the user's value, never written
    back after a read.)"""

    impl = Text()

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None or _active is None:
            return value
        return _active.seal(value)

    cache_ok = True
