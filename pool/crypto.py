"""Upstream credentials at rest: MultiFernet encryption, key rotation and display fingerprints.

``ENCRYPTION_KEYS`` holds comma-separated Fernet keys, newest first: every key decrypts, the first
encrypts. Rotation = put a new key first, run ``poolrelay encryption rotate`` (re-encrypts every
credential under the newest key), then drop the old key.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from pool.errors import CredentialError


class Secret:
    """A credential in memory: never shown by ``repr``/``str``/logging."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_keys(raw: str) -> list[bytes]:
    keys = [k.strip().encode() for k in raw.split(",") if k.strip()]
    if not keys:
        raise CredentialError("no encryption key configured")
    for k in keys:
        try:
            Fernet(k)
        except (ValueError, TypeError) as exc:
            raise CredentialError(
                "an encryption key is not a valid Fernet key (32 url-safe base64 bytes)"
            ) from exc
    return keys


class CredentialCipher:
    def __init__(self, keys: list[bytes]) -> None:
        self._multi = MultiFernet([Fernet(k) for k in keys])

    def encrypt(self, credential: Secret) -> str:
        return self._multi.encrypt(credential.reveal().encode()).decode()

    def decrypt(self, ciphertext: str) -> Secret:
        try:
            return Secret(self._multi.decrypt(ciphertext.encode()).decode())
        except InvalidToken as exc:
            raise CredentialError(
                "credential cannot be decrypted with the configured keys"
            ) from exc

    def rotate(self, ciphertext: str) -> str:
        try:
            return self._multi.rotate(ciphertext.encode()).decode()
        except InvalidToken as exc:
            raise CredentialError(
                "credential cannot be decrypted with the configured keys"
            ) from exc


def fingerprint(credential: Secret) -> str:
    """``sk-ant-…wxyz``: enough to recognise a key, never enough to use it."""
    value = credential.reveal()
    head = "sk-ant-" if value.startswith("sk-ant-") else value[: min(4, len(value) // 4)]
    tail = value[-4:] if len(value) >= 12 else ""
    return f"{head}…{tail}"


def validate_credential(value: str) -> Secret:
    value = value.strip()
    if not value:
        raise CredentialError("the credential is empty")
    if len(value) > 500 or any(c.isspace() or not c.isprintable() for c in value):
        raise CredentialError("the credential must be one line of printable characters")
    return Secret(value)
