"""pcavs_live.cli.config (layering, typing, errors, --print-config round trip), the bundled sample it points at,
and the small CLI helpers pcavs_live.cli.errors / pcavs_live.cli.logging_setup."""
from __future__ import annotations

import io
import json
import logging
import tomllib
import typing
import wave
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from pcavs_live.common.errors import UserError
from pcavs_live.cli.config import (DEFAULT_CONFIG_PATH, PROJECT_ROOT, SAMPLE_PHOTO, SAMPLE_SPEECH, SECTIONS, Config,
                        ConfigError, allowed_words, cli_options, config_to_toml, dotted_overrides, load_config)
from pcavs_live.cli.errors import EXIT_INTERRUPTED, run_with_user_errors
from pcavs_live.cli.logging_setup import setup_logging


def write(tmp_path: Path, text: str, name: str = "user.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- defaults
def test_defaults_load_with_documented_values():
    config = load_config(None, {})
    assert isinstance(config, Config)
    assert config.model.checkpoint_dir == PROJECT_ROOT / "checkpoints" / "demo"
    assert "1Zehr3JLIpzdg2S5zZrhIbpYPKF-4gKU_" in config.model.checkpoint_url
    assert (config.model.device, config.model.dtype, config.model.noise) == ("auto", "auto", "fixed")
    assert config.model.mouth_weight == pytest.approx(1.2) and isinstance(config.model.mouth_weight, float)
    assert (config.audio.source, config.audio.gain) == ("sample", "running")
    assert config.audio.file_path == SAMPLE_SPEECH and not config.audio.is_mic
    assert (config.pose.source, config.pose.webcam_index) == ("still", 0)
    assert config.pose.video_path is None
    assert config.output.targets == ("webrtc",)
    assert (config.server.host, config.server.port, config.server.token) == ("127.0.0.1", 8080, None)
    assert (config.audio.device, config.vcam.device, config.vcam.backend) == (None, None, None)  # "" = none
    assert config.identity.photo == SAMPLE_PHOTO and SAMPLE_PHOTO.is_file()


def test_default_file_must_define_every_key(tmp_path):
    text = DEFAULT_CONFIG_PATH.read_text().replace("port = 8080\n", "")
    with pytest.raises(ConfigError, match=r"server\.port is missing"):
        load_config(None, {}, default_path=write(tmp_path, text, "default.toml"))


# --------------------------------------------------------------------------- layering
def test_file_then_overrides_precedence(tmp_path):
    user = write(tmp_path, '[server]\nport = 9000\ntoken = "s3cret"\n[audio]\nsource = "mic"\n')
    config = load_config(user, {"server.port": "9100", "pose.source": None})
    assert config.server.port == 9100            # override beats file
    assert config.server.token == "s3cret"       # file beats default
    assert config.audio.source == "mic" and config.audio.file_path is None
    assert config.server.host == "127.0.0.1"     # untouched default
    assert config.pose.source == "still"         # None override = not given


def test_relative_paths_file_vs_override(tmp_path):
    user = write(tmp_path, '[identity]\nphoto = "photos/me.jpg"\n[audio]\nsource = "talk.wav"\n')
    config = load_config(user, {})
    assert config.identity.photo == PROJECT_ROOT / "photos" / "me.jpg"
    assert config.audio.file_path == PROJECT_ROOT / "talk.wav"
    config = load_config(user, {"identity.photo": "x/../me.png", "pose.source": "clip.mp4"}, cwd=tmp_path)
    assert config.identity.photo == tmp_path / "me.png"
    assert config.pose.video_path == tmp_path / "clip.mp4"
    assert load_config(None, {"output.file": Path("/abs/o.mp4")}).output.file == Path("/abs/o.mp4")


def test_override_strings_are_converted():
    config = load_config(None, dotted_overrides([
        "server.port=9000", "output.targets=vcam, file,vcam", "model.mouth_weight=2", "pose.smoothing=0",
        "model.device=cuda:1", "audio.device=3"]))
    assert config.server.port == 9000
    assert config.output.targets == ("vcam", "file")      # comma list, duplicates dropped
    assert config.model.mouth_weight == 2.0 and config.pose.smoothing == 0.0
    assert config.model.device == "cuda:1"
    assert config.audio.device == "3"                      # device names/indices stay text
    assert load_config(None, {"output.targets": '["file"]'}).output.targets == ("file",)
    assert load_config(None, {"output.targets": ("webrtc", "file")}).output.targets == ("webrtc", "file")


def test_dotted_overrides_parsing():
    assert dotted_overrides(["a_b.c=1", "server.token=x=y", "server.token=z"]) == {"a_b.c": "1", "server.token": "z"}
    for bad in ["serverport=1", "server.port", "=1", "Server.Port=1"]:
        with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
            dotted_overrides([bad])


# --------------------------------------------------------------------------- errors
def test_unknown_key_names_key_and_file(tmp_path):
    user = write(tmp_path, "[server]\nprot = 9000\n")
    with pytest.raises(ConfigError) as info:
        load_config(user, {})
    assert "server.prot" in str(info.value) and str(user) in str(info.value)
    assert "server.port" in info.value.hint


def test_unknown_section_and_non_table(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section 'sever' in .*user\.toml"):
        load_config(write(tmp_path, "[sever]\nport = 1\n"), {})
    with pytest.raises(ConfigError, match=r"'server' in .*must be a table"):
        load_config(write(tmp_path, "server = 3\n"), {})


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown key 'model.mouthweight' in command-line overrides") as info:
        load_config(None, {"model.mouthweight": "1"})
    assert "model.mouth_weight" in info.value.hint


@pytest.mark.parametrize("line, key, expected, shown", [
    ('[server]\nport = "8080"', "server.port", "an integer", "'8080'"),
    ("[server]\nport = true", "server.port", "an integer", "True"),
    ('[model]\nmouth_weight = "1.2"', "model.mouth_weight", "a number", "'1.2'"),
    ("[identity]\nphoto = 5", "identity.photo", "a path", "5"),
    ('[output]\ntargets = "webrtc"', "output.targets", "a list of strings", "'webrtc'"),
    ("[audio]\ndevice = 3", "audio.device", "a string", "3"),
])
def test_wrong_type_names_key_type_value_and_file(tmp_path, line, key, expected, shown):
    user = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(user, {})
    message = str(info.value)
    assert key in message and expected in message and shown in message and str(user) in message
    assert "\n" not in message


def test_int_is_accepted_for_float_but_not_nan(tmp_path):
    assert load_config(write(tmp_path, "[model]\nmouth_weight = 1\n"), {}).model.mouth_weight == 1.0
    with pytest.raises(ConfigError, match=r"model\.mouth_weight in .*expected a number, got nan"):
        load_config(write(tmp_path, "[model]\nmouth_weight = nan\n"), {})


@pytest.mark.parametrize("overrides, pattern", [
    ({"model.noise": "rnd"}, r"model\.noise .*one of 'fixed', 'random', 'zero', got 'rnd'"),
    ({"model.device": "gpu"}, r"model\.device .*'cuda:N'.*got 'gpu'"),
    ({"server.port": "70000"}, r"server\.port .*<= 65535"),
    ({"server.port": "80a"}, r"server\.port .*expected an integer, got '80a'"),
    ({"pose.smoothing": "1"}, r"pose\.smoothing .*< 1\.0"),
    ({"pose.webcam_index": "-1"}, r"pose\.webcam_index .*>= 0"),
    ({"output.targets": "webrtc,tv"}, r"output\.targets .*unknown entry 'tv'"),
    ({"output.targets": ""}, r"output\.targets .*must not be empty"),
    ({"audio.source": " "}, r"audio\.source .*'sample', 'mic' or a file path"),
    ({"model.mouth_weight": "nan"}, r"model\.mouth_weight .*expected a number"),
])
def test_invalid_values(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml not found"):
        load_config(tmp_path / "nope.toml", {})
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        load_config(write(tmp_path, "[server\nport=1\n", "bad.toml"), {})
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, {})


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


# --------------------------------------------------------------------------- one table: types → rules
def _word_keys() -> list[str]:
    return [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in fields(cls)
            if allowed_words(f"{section}.{f.name}")]


def test_allowed_words_come_from_the_field_types():
    """The Literal on each field is the only list of allowed words; spot-check that it is the one used."""
    assert allowed_words("model.dtype") == ("auto", "float32", "float16", "bfloat16")
    assert allowed_words("output.targets") == ("webrtc", "vcam", "vmic", "file", "whip")
    assert allowed_words("audio.source") == ("sample", "mic")
    assert allowed_words("server.port") == ()
    assert set(_word_keys()) == {"model.dtype", "model.noise", "audio.source", "audio.gain", "pose.source",
                                 "output.targets", "output.framing", "vcam.backend"}


@pytest.mark.parametrize("key", _word_keys())
def test_every_allowed_word_loads_and_others_are_refused(key, tmp_path):
    words = allowed_words(key)
    for word in words:
        value = load_config(None, {key: word}, cwd=tmp_path)
        got = getattr(getattr(value, key.split(".")[0]), key.split(".")[1])
        assert got == ((word,) if isinstance(got, tuple) else word)
    if key.endswith(".source"):  # a word, or else a path: any other word is a file path
        config = load_config(None, {key: "no-such-word"}, cwd=tmp_path)
        assert getattr(config, key.split(".")[0]).source == tmp_path / "no-such-word"
        return
    with pytest.raises(ConfigError) as info:
        load_config(None, {key: "no-such-word"}, cwd=tmp_path)
    assert all(repr(w) in str(info.value) for w in words), str(info.value)


def test_engine_noise_modes_match_the_config():
    from pcavs.engine import NoiseMode
    assert typing.get_args(NoiseMode) == allowed_words("model.noise")


@pytest.mark.parametrize("key", ["audio.device", "server.token", "vcam.device", "vcam.backend"])
def test_empty_string_means_none_once_at_load(key, tmp_path):
    section, name = key.split(".")
    from_file = load_config(write(tmp_path, f'[{section}]\n{name} = ""\n'), {})
    from_override = load_config(None, {key: ""})
    assert getattr(getattr(from_file, section), name) is None
    assert getattr(getattr(from_override, section), name) is None
    assert f'{name} = ""' in config_to_toml(from_file).split(f"[{section}]")[1]


def test_vcam_backend_refuses_unknown_names_listing_auto_too():
    assert load_config(None, {"vcam.backend": "obs"}).vcam.backend == "obs"
    with pytest.raises(ConfigError, match=r"vcam\.backend .*one of '', 'v4l2loopback', 'obs', 'unitycapture', got 'x'"):
        load_config(None, {"vcam.backend": "x"})


def test_cli_options_are_derived_from_the_fields():
    options = {o.flag: o for o in cli_options()}
    assert options["--dtype"].key == "model.dtype" and options["--dtype"].choices == allowed_words("model.dtype")
    assert options["--noise"].choices == ("fixed", "random", "zero")
    assert options["--audio"].choices is None and options["--audio"].metavar == "sample|mic|FILE"
    assert options["--pose"].metavar == "still|webcam|none|VIDEO"
    assert options["--port"].type is int and options["--webcam-index"].type is int
    assert options["--audio-device"].type is None  # device names/indices stay text
    assert options["--vcam-device"].key == "vcam.device" and options["--vcam-device"].dest == "vcam_device"
    keys = [o.key for o in cli_options()]
    assert len(set(keys)) == len(keys) and len(options) == len(keys)


# --------------------------------------------------------------------------- --print-config
def test_print_config_round_trip(tmp_path):
    config = load_config(None, {
        "server.token": 'quote" back\\slash tab\t ünï', "output.targets": "file,webrtc",
        "model.mouth_weight": "0.1", "audio.source": "my dir/speech file.wav", "pose.smoothing": "0.25",
        "model.noise_seed": "-7", "vcam.backend": "obs", "audio.device": "USB mic"}, cwd=tmp_path)
    assert config.vcam.device is None and config.audio.source == tmp_path / "my dir" / "speech file.wav"
    text = config_to_toml(config)
    tomllib.loads(text)  # valid TOML on its own
    again = load_config(write(tmp_path, text, "printed.toml"), {})
    assert again == config
    assert config_to_toml(again) == text
    assert set(tomllib.loads(text)) == set(tomllib.loads(DEFAULT_CONFIG_PATH.read_text()))


# --------------------------------------------------------------------------- bundled sample
def test_sample_photo_is_the_skimage_astronaut_with_anchor_sidecar():
    import cv2
    from skimage.data import astronaut

    rgb = cv2.imread(str(SAMPLE_PHOTO), cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_array_equal(rgb, astronaut())
    sidecar = json.loads(Path(str(SAMPLE_PHOTO) + ".landmarks.json").read_text())
    assert sidecar["anchors"] == {"left_eye": [202.5, 102.5], "right_eye": [246.0, 102.5], "mouth": [222.5, 144.0]}
    a = sidecar["anchors"]
    assert sidecar["landmarks"] == [a["left_eye"], a["right_eye"], a["mouth"]]


def test_sample_speech_format_and_sizes():
    with wave.open(str(SAMPLE_SPEECH)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16000)
        frames = wav.readframes(wav.getnframes())
        seconds = wav.getnframes() / 16000
    assert 6.0 <= seconds <= 8.0
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float64) / 32768
    assert 0.05 < np.sqrt(np.mean(samples ** 2)) and np.abs(samples).max() < 1.0  # audible, not clipped
    total = sum(p.stat().st_size for p in SAMPLE_PHOTO.parent.iterdir() if p.is_file())
    assert total < 1_000_000


# --------------------------------------------------------------------------- pcavs_live.cli.errors
def test_user_error_prints_one_line_and_hint():
    err = io.StringIO()

    def main() -> int:
        raise UserError("photo me.jpg not found", hint="pass --photo PATH")

    assert run_with_user_errors(main, debug=False, stderr=err) == 2
    assert err.getvalue() == "error: photo me.jpg not found\nhint: pass --photo PATH\n"


def test_module_error_types_are_user_errors_collapsed_to_one_line():
    """Each module's own error type subclasses UserError, so the entry point needs no list of them."""
    from capture.audio_sources import AudioDeviceError
    from capture.pose_sources import CameraError, VideoSourceError
    from pcavs.alignment import AlignmentError, FaceNotFoundError
    from pcavs.checkpoints import CheckpointError
    from capture.audio_files import AudioFileError
    from stream.recorder import RecorderError
    from stream.sinks import SinkError
    from stream.vcam import VirtualCameraError
    from stream.webrtc import ServerError
    for kind in (AudioDeviceError, CameraError, VideoSourceError, AlignmentError, CheckpointError,
                 AudioFileError, RecorderError, SinkError, VirtualCameraError, ServerError):
        assert issubclass(kind, UserError), kind
    err = io.StringIO()

    def main() -> int:
        raise FaceNotFoundError("no face found in me.jpg\n  (details on a second line)")

    assert run_with_user_errors(main, False, stderr=err) == 2
    assert err.getvalue() == "error: no face found in me.jpg (details on a second line)\n"


def test_debug_reraises_and_other_errors_propagate():
    def user_fail() -> int:
        raise UserError("x")

    def bug() -> int:
        raise KeyError("x")

    with pytest.raises(UserError):
        run_with_user_errors(user_fail, True, stderr=io.StringIO())
    with pytest.raises(KeyError):  # not a user error: it is a bug, keep the traceback
        run_with_user_errors(bug, False, stderr=io.StringIO())


def test_exit_codes_success_interrupt_and_custom():
    assert run_with_user_errors(lambda: 0, False) == 0
    assert run_with_user_errors(lambda: 3, False) == 3

    def interrupted() -> int:
        raise KeyboardInterrupt

    err = io.StringIO()
    assert run_with_user_errors(interrupted, False, stderr=err) == EXIT_INTERRUPTED == 130
    assert "Traceback" not in err.getvalue()

    class Busy(UserError):
        exit_code = 4

    def busy() -> int:
        raise Busy("camera /dev/video0 is busy")

    assert run_with_user_errors(busy, False, stderr=io.StringIO()) == 4


# --------------------------------------------------------------------------- pcavs_live.cli.logging_setup
@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("aiortc").level)
    yield
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])
    logging.getLogger("aiortc").setLevel(saved[2])


@pytest.mark.parametrize("verbosity, shown", [(-1, {"WARNING"}), (0, {"INFO", "WARNING"}),
                                              (1, {"DEBUG", "INFO", "WARNING"})])
def test_logging_levels(restore_logging, verbosity, shown):
    stream = io.StringIO()
    setup_logging(verbosity, stream=stream)
    setup_logging(verbosity, stream=stream)  # a second call must not double the output
    log = logging.getLogger("pcavs.test")
    for level in ("DEBUG", "INFO", "WARNING"):
        log.log(getattr(logging, level), "msg-%s", level)
    lines = stream.getvalue().splitlines()
    assert {line.rsplit("msg-", 1)[1] for line in lines} == shown
    assert len(lines) == len(shown)
    assert " pcavs.test: msg-WARNING" in lines[-1] and lines[-1][8] == "."  # HH:MM:SS.mmm prefix


def test_logging_keeps_chatty_libraries_quiet_at_v(restore_logging):
    stream = io.StringIO()
    setup_logging(1, stream=stream)
    logging.getLogger("aiortc").info("ice chatter")
    assert stream.getvalue() == ""
    setup_logging(2, stream=stream)
    logging.getLogger("aiortc").info("ice chatter")
    assert "ice chatter" in stream.getvalue()
