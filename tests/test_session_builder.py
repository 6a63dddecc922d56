"""SessionBuilder → Session: parts given to the builder replace the config's (no networks loaded), a build
that fails closes what it had opened, and the built session runs and closes its parts."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from pcavs.constants import CROP_SIZE
from pcavs_live.cli.config import load_config
from pcavs_live.common.errors import UserError
from pcavs_live.pipeline.session import RunOptions, Session, SessionBuilder


class ListSink:
    def __init__(self) -> None:
        self.opened: tuple[int, int] | None = None
        self.indices: list[int] = []
        self.closed = False

    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        self.opened = (width, height)

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        self.indices.append(frame_index)

    def close(self) -> None:
        self.closed = True


class GreyFace:
    """A renderer stand-in: one grey crop per mel window."""

    def __init__(self) -> None:
        self.rows = 0

    def render(self, mel_windows, pose_codes=None, times=None):
        self.rows += len(mel_windows)
        return np.full((len(mel_windows), CROP_SIZE, CROP_SIZE, 3), 128, np.uint8)


def test_given_parts_build_a_session_that_renders_every_slot_without_networks(tmp_path):
    config = load_config(None, {"model.checkpoint_dir": str(tmp_path / "no-checkpoints"),
                                "output.targets": ["file"], "output.file": str(tmp_path / "unused.mp4")})
    sink, face = ListSink(), GreyFace()
    placeholder = np.zeros((CROP_SIZE, CROP_SIZE, 3), np.uint8)
    builder = SessionBuilder(config, RunOptions(max_seconds=0.4, status_interval_s=0), avatar=(face, placeholder),
                             sinks=sink)
    assert builder.realtime  # given sinks are live unless the run says otherwise
    builder = SessionBuilder(config, RunOptions(realtime=False, max_seconds=0.4, status_interval_s=0),
                             avatar=(face, placeholder), sinks=sink)
    with builder.build() as session:
        assert isinstance(session, Session) and session.renderer is face and session.sinks is sink
        assert session.pose is None and session.server is None
        summary = session.run(threading.Event())
    assert summary.frames_out == 10 and sink.indices == list(range(10)) and face.rows == 10
    assert sink.opened == (CROP_SIZE, CROP_SIZE) and sink.closed
    assert not (tmp_path / "unused.mp4").exists()   # the configured outputs were not built


def test_a_failed_build_closes_the_viewer_it_had_opened(tmp_path):
    config = load_config(None, {"server.port": "0", "identity.photo": str(tmp_path / "missing.png"),
                                "output.targets": ["webrtc"]})
    builder = SessionBuilder(config, RunOptions(status_interval_s=0), ice_host_addresses=("127.0.0.1",))
    with pytest.raises(UserError, match="missing.png not found"):
        builder.build()
    server = builder.server
    assert server is not None and not server.running
    with socket.create_server(("127.0.0.1", server.port)):   # its port is free again
        pass
