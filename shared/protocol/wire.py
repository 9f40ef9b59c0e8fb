"""seedtune protobufs inside Flower messages, and what they cost on the wire.

A message's content is one ConfigRecord holding the serialized protobuf under ``payload``. Sizes are
measured the way Flower 1.41 ships a message: as the deflated objects of its tree (message metadata,
record dict, record), so the reported bytes are the real payload, envelope included.
"""

from __future__ import annotations

from typing import TypeVar

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

RECORD = "seedtune"
# The Flower message types of the protocol: the server sends them, the ClientApp routes on them (client/app.py)
TRAIN, SYNC, IDENTIFY, EVALUATE = "train", "query", "query.identify", "evaluate"
SECURE = "train.secure"  # stages 2 to 4 of a secure-aggregation round (shared.protocol.secagg)
MAX_PAYLOAD_BYTES = 64 << 20  # a reply is a few bytes per step; an instruction carries at most a ledger

T = TypeVar("T", bound=ProtoMessage)


class WireError(ValueError):
    """A message's content is missing, oversized or not the expected protobuf."""


class PayloadTooLarge(WireError):
    """The payload exceeds the size limit; it was not parsed."""


def to_content(payload: ProtoMessage) -> RecordDict:
    # Deterministic: the same message is always the same bytes (a node resends a stored reply byte for byte).
    return content_of(payload.SerializeToString(deterministic=True))


def content_of(payload: bytes) -> RecordDict:
    """A message content around already serialized bytes (the server serializes each distinct instruction
    once per round and wraps the same bytes for every node that gets it)."""
    return RecordDict({RECORD: ConfigRecord({"payload": payload})})


def _payload(content: RecordDict | None) -> bytes:
    """The payload bytes of a content that holds seedtune's record alone, with its payload alone; a second
    record or key (which would ride along unchecked, e.g. 50 MB beside a 40-byte reply) is a WireError."""
    if content is None or set(content.keys()) != {RECORD} or RECORD not in content.config_records:
        names = sorted(content.keys()) if content is not None else []
        raise WireError(f"message content must hold the '{RECORD}' config record alone; it holds {names}")
    record = content.config_records[RECORD]
    if set(record.keys()) != {"payload"}:
        raise WireError(f"the '{RECORD}' record must hold 'payload' alone; it holds {sorted(record.keys())}")
    raw = record["payload"]
    if not isinstance(raw, bytes):
        raise WireError(f"payload is {type(raw).__name__}, expected bytes")
    return raw


def from_content(content: RecordDict, cls: type[T], max_bytes: int = MAX_PAYLOAD_BYTES) -> T:
    raw = _payload(content)
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"payload of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        raise WireError(f"payload is not a valid {cls.DESCRIPTOR.full_name}: {exc}") from exc


def payload_length(message: Message) -> int:
    """Length of a message's seedtune payload, without parsing it (-1: an error message, no payload, or a
    content of another shape)."""
    if message.has_error():
        return -1
    try:
        return len(_payload(message.content))
    except WireError:
        return -1


def wire_bytes(message: Message) -> int:
    """Bytes Flower transfers for this message: every deflated object in its tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
