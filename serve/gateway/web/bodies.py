"""Request bodies read in memory, within the door's limit, while the call is admitted.

Not aiohttp's ``request.read()`` / ``request.post()``: ``read()`` keeps its copy of the
body on the request until the answer is sent (a second copy beside the parsed one), and
``post()`` spools file parts over 1 MiB to temporary files, where the gateway's /tmp is a
small tmpfs (64 MiB in deploy/k8s/). Here a body is read once, counted as it arrives
(`TooLarge` the moment it passes the limit, declared or not), and dropped once parsed.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDict

from cliplora.core.errors import InvalidArgument

CHUNK = 256 * 1024


@dataclass(frozen=True)
class Upload:
    """A file part: its name as sent and its bytes."""

    filename: str
    data: bytes


class TooLarge(Exception):
    """The body is over the door's limit."""


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body; TooLarge past `limit` bytes (a declared length over it never gets
    here: `cliplora.serve.gateway.web.guard` refuses it first)."""
    chunks, total = [], 0
    async for chunk in request.content.iter_chunked(CHUNK):
        total += len(chunk)
        if total > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: web.Request, limit: int, max_parts: int) -> MultiDict[str | Upload]:
    """Every part of a multipart form by its field name, in order; TooLarge past `limit`
    bytes, InvalidArgument for a form that is not well formed or has over `max_parts` parts."""
    try:
        return await _parts(request, limit, max_parts)
    except (ValueError, RuntimeError, binascii.Error, HttpProcessingError) as exc:
        # aiohttp's reader: no boundary, a body that does not start with it, a bad
        # transfer encoding, too many headers in a part.
        raise InvalidArgument(f"malformed multipart/form-data body: {exc}") from None


async def _parts(request: web.Request, limit: int, max_parts: int) -> MultiDict[str | Upload]:
    reader = await request.multipart()
    fields: MultiDict[str | Upload] = MultiDict()
    total = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.name is None:
            raise InvalidArgument("every form part needs a name (Content-Disposition: form-data; name=...)")
        if len(fields) >= max_parts:
            raise InvalidArgument(f"more than {max_parts} form parts (the gateway's limits on images, labels and "
                                  "templates allow no more)")
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
