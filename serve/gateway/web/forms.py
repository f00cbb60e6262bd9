"""multipart/form-data read into memory, within the door's body limit.

Not aiohttp's ``request.post()``: it spools file parts over 1 MiB to temporary files, and
the gateway's /tmp is a small tmpfs (64 MiB in deploy/k8s/) that a batch of photos would
fill. A JSON body is held in memory whole anyway; a form costs the same here.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import BodyPartReader, hdrs, web
from multidict import MultiDict

from cliplora.core.errors import InvalidArgument

CHUNK = 256 * 1024
MAX_FIELDS = 1000  # parts per form: more images or labels than any limit allows


@dataclass(frozen=True)
class Upload:
    """A file part: its name as sent and its bytes."""

    filename: str
    data: bytes


class TooLarge(Exception):
    """The form's parts together are over the door's body limit."""


async def read_form(request: web.Request, limit: int) -> MultiDict[str | Upload]:
    """Every part of the form by its field name, in order; TooLarge past `limit` bytes."""
    reader = await request.multipart()
    fields: MultiDict[str | Upload] = MultiDict()
    total = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.name is None:
            raise InvalidArgument("every form part needs a name (Content-Disposition: form-data; name=...)")
        if len(fields) >= MAX_FIELDS:
            raise InvalidArgument(f"more than {MAX_FIELDS} form parts")
        if part.headers.get(hdrs.CONTENT_ENCODING, "identity").lower() != "identity":
            raise InvalidArgument(f"form part {part.name}: compressed parts are not accepted (Content-Encoding)")
        chunks = []
        while chunk := await part.read_chunk(CHUNK):
            total += len(chunk)
            if total > limit:
                raise TooLarge
            chunks.append(chunk)
        data = part.decode(b"".join(chunks))
        if part.filename is not None:
            fields.add(part.name, Upload(part.filename, data))
        else:
            try:
                fields.add(part.name, data.decode(part.get_charset(default="utf-8")))
            except (UnicodeDecodeError, LookupError):
                raise InvalidArgument(f"form field {part.name} is not text in its charset") from None
    return fields
