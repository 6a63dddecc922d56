"""Browser viewer: the avatar's video and voice over WebRTC (aiohttp signalling + aiortc media).

Shape of the thing
------------------
`WebRTCServer` (server.py) runs on a `WebHost` (host.py: binding, token, ICE checks, one thread
running one asyncio loop, JSON bodies, negotiation; the studio server composes one too); aiohttp
serves the page (`stream/web/`), `POST /offer` (SDP offer in, answer out), `GET /stats` and `GET /health` on it, and
every viewer's RTCPeerConnection lives there too. `WebRTCSink` (sink.py) is the FrameSink the scheduler
writes to: it only drops each frame + its 40 ms of audio into two small bounded buffers (buffer.py)
and returns, so a slow network or a stuck browser can never hold up the render loop.

The buffers feed one video and one audio *source track* (tracks.py: frame-index timestamps, audio
Opus-encoded once); every viewer gets proxies of them. `use_host_addresses` (ice.py) lets viewers on
the same machine connect over loopback; `ice_servers` (ice.py) turns the config's STUN/TURN keys into
the servers used for viewers behind NAT. Nothing in this package can grow without bound.
"""
from stream.webrtc.ice import ice_servers, use_host_addresses
from stream.webrtc.server import ServerError, WebRTCServer
from stream.webrtc.sink import WebRTCSink

__all__ = ["ServerError", "WebRTCServer", "WebRTCSink", "ice_servers", "use_host_addresses"]
