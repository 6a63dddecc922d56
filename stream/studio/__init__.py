"""The studio: a browser sends its microphone (and camera) and gets its own avatar back, many at once.

`StudioServer` (server.py) is the page and HTTP/WebRTC API, one session per browser, each with its own
keys and its own outgoing tracks (`SessionOutput`, output.py); uploads are checked by `decode_photo`
(uploads.py). What a session *does* (identity, sources, scheduler, shared renderer) is the backend's:
`pcavs_live.pipeline.studio` provides it, so this package stays below `pipeline/`.
"""
from stream.studio.output import SessionOutput
from stream.studio.server import SessionFactory, SessionRuntime, StudioServer
from stream.studio.uploads import MAX_PHOTO_SIDE, MAX_UPLOAD_BYTES, UploadError, decode_photo

__all__ = ["MAX_PHOTO_SIDE", "MAX_UPLOAD_BYTES", "SessionFactory", "SessionOutput", "SessionRuntime",
           "StudioServer", "UploadError", "decode_photo"]
