"""The JSON messages every transport exchanges, checked in one place.

Notices, fetch requests and answers, collective requests and answers and CUDA IPC descriptions
all arrive as untrusted bytes. They are read here with the same limits (size, nesting depth,
no NaN or Infinity), their integer fields are checked by the same function, their answers are
turned into exceptions by the same function, and what is signed or written is encoded by the
same function. A refusal names the message (`what`) and the field.
"""

from __future__ import annotations

import json
import re

from .._errors import ConfigurationError, ProtocolError, TransferError, ViperError

__all__ = ["MAX_DEPTH", "check_model_name", "canonical_json", "load_object", "object_of", "is_count", "count",
           "refusal", "raise_for_answer", "first_line"]

MAX_DEPTH = 32  # the deepest message, a notice (its layout's entries' shapes), nests 4 levels
_CODE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(name: object) -> str:
    """Model names become ZeroMQ topics and directory names, so they are kept plain."""
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise ConfigurationError(
            f"model_name {name!r} is not valid: use 1-128 characters from letters, digits, "
            "'.', '_' and '-', starting with a letter or digit (for example 'nt3')")
    return name


def canonical_json(obj: object) -> bytes:
    """The one JSON encoding used for MACs and on disk: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def load_object(raw: bytes, what: str, *, limit: int | None, invalid: str = "is not valid JSON") -> dict:
    """Parse untrusted bytes that must hold one JSON object of at most `limit` bytes.

    `invalid` is how the refusal of bytes that do not parse reads after `what` (the decoder's
    reason follows it)."""
    if limit is not None and len(raw) > limit:
        raise ProtocolError(f"{what} is {len(raw)} bytes, over the {limit}-byte limit")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
        too_deep = _deeper_than(value, MAX_DEPTH)
    except RecursionError:  # nested past the interpreter's own limit
        too_deep = True
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{what} {invalid}: {exc}") from None
    if too_deep:
        raise ProtocolError(f"{what} {invalid}: it nests deeper than {MAX_DEPTH} levels")
    return object_of(value, what)


def object_of(value: object, what: str) -> dict:
    """`value` itself, when it is a JSON object."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def is_count(value: object) -> bool:
    """A non-negative integer (JSON true and false are not integers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def count(message: dict, key: str, what: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    """The integer field `key`, between `minimum` and `maximum` (both included)."""
    value = message.get(key)
    if not is_count(value):
        raise ProtocolError(f"{what} field {key!r} must be a non-negative integer, got {value!r:.50}")
    if value < minimum:
        raise ProtocolError(f"{what} field {key!r} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ProtocolError(f"{what} field {key!r} must be at most {maximum}, got {value}")
    return value


def refusal(exc: BaseException) -> dict[str, object]:
    """A server's answer for a request it will not serve: the exception's code and message."""
    code = exc.code if isinstance(exc, ViperError) and exc.code else "server-error"
    return {"status": "error", "code": code, "reason": str(exc)}


def raise_for_answer(answer: dict, version: int | None, *, holder: str, refused: str) -> None:
    """Raise the TransferError a server's answer other than "ok" means, with the answer's code
    (and, for "gone", the tiers that still hold the version). `holder` names the server in
    "no longer in <holder>'s memory"; `refused` opens the message of any other refusal."""
    status = answer.get("status")
    if status == "ok":
        return
    if status == "gone":
        listed = answer.get("tiers")
        tiers = tuple(t for t in listed if isinstance(t, str)) if isinstance(listed, list) else ()
        raise TransferError(f"version {version} is no longer in {holder}'s memory; it still lives in: "
                            f"{', '.join(tiers) or 'no tier'}", code="gone", tiers=tiers)
    code = answer.get("code")
    raise TransferError(f"{refused}: {answer.get('reason', answer)!s:.300}",
                        code=code if isinstance(code, str) and _CODE.match(code) else None)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's run to pages), for our own messages."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed (canonical JSON has no NaN or Infinity)")


def _deeper_than(value: object, limit: int) -> bool:
    """Whether containers nest more than `limit` levels (walked level by level, not recursively:
    encoding the message again for its MAC would otherwise be the first to overflow the stack)."""
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(limit):
        if not level:
            return False
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list))]
    return bool(level)
