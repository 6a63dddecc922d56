"""The server side of WHEP (draft-ietf-wish-whep) that the viewer server and the studio share.

Why WHEP beside our own `POST /offer`: any WHEP player (OBS's WHEP source, Eyevinn's web player,
`stream.whep.WhepClient`, room.html?whep=…) can then watch a pcavs-live avatar without our page.
A WHEP viewer is an ordinary viewer of the server that answers it (same token, ICE settings,
viewer limit and shared encoder); only the envelope differs:

* `POST` with `Content-Type: application/sdp` (else 415) and the SDP offer as the body, the token as
  `Authorization: Bearer …` (`?token=` also accepted) → `201 Created`, the answer as
  `application/sdp`, and `Location:` the viewer's resource, whose id is a fresh random string
  (it is the viewer's own key to leaving: `DELETE` it → 200, unknown → 404);
* no trickle ICE: our answer carries every candidate (aiortc gathers before answering), and a
  `PATCH` of the resource answers 405 (aiohttp's default for a method without a route), which the
  draft allows;
* CORS: `OPTIONS` answers the preflight and every WHEP response allows any origin and exposes
  `Location`, so a player on another origin can watch (the bearer token, not a cookie, is the key);
* refusals are a status and one line, as JSON `{"error": …}` (the client shows the line).
"""
from __future__ import annotations

import codecs
import secrets

from aiohttp import web

from stream.webrtc.host import MAX_OFFER_BYTES, error_response, request_token

SDP = "application/sdp"
CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "Location"}
PREFLIGHT = dict(CORS, **{"Access-Control-Allow-Methods": "POST, DELETE, OPTIONS",
                          "Access-Control-Allow-Headers": "Authorization, Content-Type",
                          "Access-Control-Max-Age": "600"})


def bearer_token(request: web.Request) -> str | None:
    """The `Authorization: Bearer` token, else `?token=` / `X-Token` (a link that carries its token)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request_token(request)


def refusal(status: int, message: str) -> web.Response:
    """A WHEP refusal: one line, readable cross-origin."""
    response = error_response(status, message)
    response.headers.update(CORS)
    return response


async def read_offer(request: web.Request, max_bytes: int = MAX_OFFER_BYTES) -> str | web.Response:
    """The SDP offer of a WHEP POST, or the refusal saying what is wrong with the request."""
    if request.content_type != SDP:
        return refusal(415, f"a WHEP offer is sent as Content-Type: {SDP}, got "
                            f"{(request.content_type or 'none')[:60]!r}")
    if request.content_length is not None and request.content_length > max_bytes:
        return refusal(413, f"the offer is larger than {max_bytes // 1024} KiB")
    raw = bytearray()
    try:
        while chunk := await request.content.read(65536):
            raw += chunk
            if len(raw) > max_bytes:
                return refusal(413, f"the offer is larger than {max_bytes // 1024} KiB")
    except Exception:  # noqa: BLE001 - a client that went away mid-body
        return refusal(400, "the offer could not be read")
    try:
        charset_ok = codecs.lookup(request.charset or "utf-8").name in ("utf-8", "ascii")
    except LookupError:
        charset_ok = False
    if not charset_ok:
        return refusal(400, f"unsupported charset {(request.charset or '')[:40]!r}; send the SDP as UTF-8")
    try:
        sdp = raw.decode("utf-8")
    except UnicodeDecodeError:
        return refusal(400, "the offer is not UTF-8 text")
    if not sdp.lstrip().startswith("v="):
        return refusal(400, "the body is not an SDP offer (it must start with \"v=\")")
    return sdp


def new_resource_id() -> str:
    """A viewer resource's id: unguessable, since holding it is enough to end that viewer."""
    return secrets.token_urlsafe(16)


def answer_response(sdp: str, location: str) -> web.Response:
    """201 Created: the SDP answer, `Location` the viewer's resource (relative to the server)."""
    return web.Response(status=201, text=sdp, content_type=SDP,
                        headers=dict(CORS, Location=location, **{"Cache-Control": "no-store"}))


async def answer_offer(request: web.Request, add_viewer, viewers: dict, location_prefix: str) -> web.Response:
    """The rest of a WHEP POST once the caller is authorised, the same on every server: read the offer,
    add the viewer (`add_viewer(sdp)` → (peer, answer) or a refusal), keep its peer in `viewers` under a
    new resource id and answer 201 with `location_prefix/ID` as the Location."""
    sdp = await read_offer(request)
    if isinstance(sdp, web.Response):
        return sdp
    added = await add_viewer(sdp)
    if isinstance(added, web.Response):
        added.headers.update(CORS)
        return added
    pc, answer = added
    resource = new_resource_id()
    viewers[resource] = pc
    return answer_response(answer.sdp, f"{location_prefix}/{resource}")


def deleted_response() -> web.Response:
    return web.Response(status=200, headers=CORS)


async def preflight(request: web.Request) -> web.Response:
    """The CORS preflight of a cross-origin WHEP player."""
    return web.Response(status=204, headers=PREFLIGHT)
