"""Decoding an event's payload for ``event.<field>`` filters (``ctr events 'event.container_id==web'``).

The payload's type URL names its message (``containerd.events.TaskExit``); the fields are the
protobuf field names, as containerd's generated fieldpath adaptors name them. As there, string
fields and labels are what filters compare (``event.container_id``, ``event.labels.x``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def decode_protobuf(type_url: str, value: bytes) -> Mapping[str, Any] | None:
    """The fields of a containerd event, or None for a type we do not know."""
    from google.protobuf import json_format, symbol_database

    # every event message ketch or a shim publishes: registered once imported
    from ketch.api.containerd.events import (  # noqa: F401
        container_pb2,
        content_pb2,
        image_pb2,
        namespace_pb2,
        snapshot_pb2,
        task_pb2,
    )

    try:
        message_type = symbol_database.Default().GetSymbol(type_url.rsplit("/", 1)[-1])
    except KeyError:
        return None
    fields: dict[str, Any] = json_format.MessageToDict(
        message_type.FromString(value), preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True)  # exit_status 0 is a value to filter on too
    return fields
