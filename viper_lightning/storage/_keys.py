"""The per-model key that makes the default secure: with no key configured, the producer
creates one (`/dev/shm/viper-key.<model>`, mode 0600, owned by its user) and consumers of the
same user on the same host read it. Anyone else can neither read it nor, without it, have a
notice, a fetch request or an answer believed. Consumers on other hosts are given the key
(`hmac_key` or `hmac_key_file`); running without any key is an explicit opt-out
(`allow_keyless=True`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

from .._errors import ConfigurationError
from ._shm import SHM_DIR

__all__ = ["key_file_for", "load_or_create_key", "read_key"]

KEY_BYTES = 32


def key_file_for(model: str) -> str:
    return os.path.join(SHM_DIR, f"viper-key.{model}")


def load_or_create_key(model: str) -> bytes:
    """The producer's side: this model's key on this host, created on first use."""
    path = key_file_for(model)
    key = read_key(model)
    if key is not None:
        return key
    # Written whole under a private temporary name, then linked into place: the key file never
    # exists empty (a crash, or a reader, in between), and link() fails if another made it first.
    temp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    key = secrets.token_hex(KEY_BYTES).encode()
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
        try:
            os.link(temp, path)
        except FileExistsError:
            return read_key(model) or key
    except OSError as exc:
        raise ConfigurationError(f"cannot create the key file {path}: {exc.strerror}; set hmac_key (or "
                                 "hmac_key_file) explicitly") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(temp)
    return key


def read_key(model: str) -> bytes | None:
    """The consumer's side: the key this host's producer of `model` created, or None if there is
    none yet. A key file that is not a private regular file of this user is refused: another
    user could have planted it to have their own weights accepted."""
    path = key_file_for(model)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigurationError(f"cannot read the key file {path}: {exc.strerror} (another user's?); remove "
                                 "it, or set hmac_key explicitly") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise ConfigurationError(f"the key file {path} is not a private file of this user (owner uid "
                                     f"{info.st_uid}, mode {stat.filemode(info.st_mode)}); remove it, or set "
                                     "hmac_key explicitly")
        key = handle.read(4 * KEY_BYTES).strip()
    if len(key) < 16:
        raise ConfigurationError(f"the key file {path} holds no key; remove it so the producer makes a new one")
    return key
