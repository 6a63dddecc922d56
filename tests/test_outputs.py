"""The output and input registries (pcavs_live.pipeline.outputs, pcavs_live.pipeline.inputs): the words they
hold are the config's words, `--out` is parsed from them (an unknown word that is no file path is one error
line), and an output added to the registry is built, sized and framed by the session's code unchanged."""
from __future__ import annotations

import contextlib
import dataclasses
import typing
from pathlib import Path

import numpy as np
import pytest

from pcavs.constants import CROP_SIZE, FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from pcavs_live.cli.config import load_config
from pcavs_live.cli.main import main
from pcavs_live.common.errors import EXIT_USER_ERROR
from pcavs_live.pipeline import options
from pcavs_live.pipeline.inputs import AUDIO_INPUTS, POSE_INPUTS, audio_input, pose_input
from pcavs_live.pipeline.metrics import LiveMetrics
from pcavs_live.pipeline.outputs import (OUTPUTS, Output, OutputContext, OutputError, build_sinks, is_live,
                                         parse_out)
from pcavs_live.pipeline.outputs.vcam import CALL_SIZE


class ListSink:
    """A FrameSink that keeps what it was given."""

    def __init__(self) -> None:
        self.opened: tuple[int, int] | None = None
        self.frames: list[np.ndarray] = []
        self.closed = False

    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        self.opened = (width, height)

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        self.frames.append(frame)

    def close(self) -> None:
        self.closed = True


def _context(config, registry=OUTPUTS) -> OutputContext:
    return OutputContext(config, LiveMetrics(), contextlib.ExitStack(), registry)


# ------------------------------------------------------------------ the tables agree with the config's words
def test_registries_hold_exactly_the_config_words():
    assert tuple(OUTPUTS) == typing.get_args(options.OutputTarget) == options.OUTPUT_TARGETS
    assert set(AUDIO_INPUTS) == set(options.AUDIO_KEYWORDS) | {"file"}
    assert set(POSE_INPUTS) == set(options.POSE_KEYWORDS) | {"video"}
    assert all(name == output.name for name, output in OUTPUTS.items())


def test_inputs_are_looked_up_by_word_or_path(tmp_path):
    config = load_config(None, {"audio.source": "mic", "pose.source": "webcam"})
    assert audio_input(config.audio).name == "mic" and audio_input(config.audio).device
    assert pose_input(config.pose).name == "webcam" and pose_input(config.pose).needs_detector
    config = load_config(None, {"audio.source": str(tmp_path / "a.wav"), "pose.source": str(tmp_path / "v.mp4")},
                         cwd=tmp_path)
    assert audio_input(config.audio).name == "file" and not audio_input(config.audio).device
    assert pose_input(config.pose).name == "video" and pose_input(config.pose).sequence
    still = load_config(None, {}).pose
    assert pose_input(still).frames is None and not pose_input(still).needs_detector


# ------------------------------------------------------------------ --out
def test_out_words_name_outputs_or_files():
    assert parse_out(["vcam", "out/talk.mp4", "webrtc", "vcam"]) == (["vcam", "file", "webrtc"], "out/talk.mp4")
    assert parse_out(["clip.mkv"]) == (["file"], "clip.mkv")
    assert parse_out(["file"]) == (["file"], None)          # the configured output.file


@pytest.mark.parametrize("word,hint", [("rtmp://live.example/app", "URL"), ("vcma", "did you mean --out vcam"),
                                       ("webrtcc", "did you mean --out webrtc")])
def test_an_out_word_that_is_no_output_and_no_file_is_an_error(word, hint):
    with pytest.raises(OutputError, match="is not an output") as info:
        parse_out([word])
    assert hint in info.value.hint


def test_unknown_out_word_is_one_error_line_from_the_command(capsys):
    code = main(["--out", "rtmp://live.example/app", "--print-config"], prog="run_live.py")
    captured = capsys.readouterr()
    assert code == EXIT_USER_ERROR
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("error: --out 'rtmp://live.example/app' is not an output")
    assert "Traceback" not in captured.err


def test_out_file_path_still_reaches_the_config(capsys):
    assert main(["--out", "webrtc", "--out", "out/x.mp4", "--print-config"], prog="run_live.py") == 0
    printed = capsys.readouterr().out
    assert 'targets = ["webrtc", "file"]' in printed and printed.count("out/x.mp4") == 1


def test_only_non_live_outputs_render_as_fast_as_possible():
    assert not is_live(load_config(None, {"output.targets": ["file"]}))
    assert is_live(load_config(None, {"output.targets": ["file", "webrtc"]}))


# ------------------------------------------------------------------ adding an output: one module + one line
def test_a_registered_output_is_built_sized_and_framed_by_the_session_code(monkeypatch):
    """An output added to the registry (what a new module plus its registry line give) is built through
    OutputContext, gets its own "auto" size and is framed; the outputs of one size share their framer."""
    made: list[ListSink] = []

    def build(ctx: OutputContext) -> ListSink:
        made.append(ListSink())
        return made[-1]

    registry = dict(OUTPUTS, small=Output("small", live=True, auto_size=(320, 240), build=build))
    config = load_config(None, {"output.framing": "fit"})
    config = dataclasses.replace(config, output=dataclasses.replace(config.output, targets=("small",)))
    ctx = _context(config, registry)
    monkeypatch.setattr("pcavs_live.pipeline.outputs.OUTPUTS", registry)
    sink = build_sinks(ctx, None, None)
    sink.open(CROP_SIZE, CROP_SIZE, FPS, SAMPLE_RATE)
    face = np.full((CROP_SIZE, CROP_SIZE, 3), 200, np.uint8)
    sink.write(face, np.zeros(SAMPLES_PER_FRAME, np.float32), 0)
    sink.close()
    assert len(made) == 1 and made[0].opened == (320, 240) and made[0].closed
    frame = made[0].frames[0]
    assert frame.shape == (240, 320, 3)
    assert frame[120, 160].tolist() == [200, 200, 200] and frame[120, 2].tolist() == [0, 0, 0]  # letterboxed


def test_vcam_with_vmic_is_held_back_by_the_microphone_it_shares(monkeypatch):
    """`--out vcam --out vmic`: the camera is built once, call-sized by its own size rule, behind a
    DelayedSink reading the playout delay of the very microphone sink the session writes to."""
    import stream.vcam
    import stream.vmic
    from stream.delay import DelayedSink
    from stream.framing import FramedSink

    class Mic(ListSink):
        playout_delay_s = 0.123

        def __init__(self, device=None, preroll_ms=0.0):
            super().__init__()

    class Cam(ListSink):
        def __init__(self, device=None, backend=None):
            super().__init__()

    monkeypatch.setattr(stream.vmic, "VirtualMicSink", Mic)
    monkeypatch.setattr(stream.vcam, "VirtualCameraSink", Cam)
    config = load_config(None, {"output.targets": ["vcam", "vmic"], "output.framing": "fit"})
    fan = build_sinks(_context(config), None, None)
    camera, mic = fan._sinks
    assert isinstance(mic, Mic)                                   # audio only: never framed
    assert isinstance(camera, FramedSink) and camera.framer.size == CALL_SIZE
    delayed = camera.sink
    assert isinstance(delayed, DelayedSink) and isinstance(delayed.sink, Cam)
    assert delayed._delay_s() == pytest.approx(0.123)             # the same microphone's delay


def test_every_output_with_a_doctor_check_names_a_doctor_probe():
    from pcavs_live.cli.doctor import Probes
    probe_fields = {f.name for f in dataclasses.fields(Probes)}
    checks = {name: output.doctor for name, output in OUTPUTS.items() if output.doctor is not None}
    assert set(checks) == {"webrtc", "vcam", "vmic"}
    config = load_config(None, {})
    for check in checks.values():
        assert check.probe in probe_fields
        assert isinstance(check.args(config, "Linux"), tuple) and check.fix(config, "Linux")


def test_the_output_modules_live_where_the_doc_says():
    folder = Path(__import__("pcavs_live.pipeline.outputs", fromlist=["x"]).__file__).parent
    assert {p.stem for p in folder.glob("*.py")} >= set(OUTPUTS)


# ------------------------------------------------------------------ config below the pipeline
def test_the_pipeline_owns_the_schema_and_never_imports_the_cli():
    import ast

    import pcavs_live.cli.config as loader
    from pcavs_live.cli.paths import BUNDLED_ROOT
    root = Path(options.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "pcavs_live.cli" or n.startswith("pcavs_live.cli.") for n in names), path
    assert loader.Config is options.Config and loader.SECTIONS is options.SECTIONS
    sections = {cls.__name__ for cls in options.SECTIONS.values()}
    assert not sections & {name for name, value in vars(loader).items()
                           if dataclasses.is_dataclass(value) and value.__module__ == loader.__name__}
    assert options.BUNDLED_ROOT == BUNDLED_ROOT and options.SAMPLE_SPEECH.is_file()


def test_noise_mode_is_defined_once():
    import pcavs.engine
    from pcavs.constants import NoiseMode
    assert pcavs.engine.NoiseMode is NoiseMode
    assert typing.get_type_hints(options.ModelConfig)["noise"] is NoiseMode
    assert not hasattr(pcavs.engine, "generate")
