"""Call-sized pictures: size parsing per output, `fit` letterboxing, `paste` back into the photo (exact
photo outside the mask, exact warped crop inside, the right place, no hard edge), the shared framer
cache, and a session writing a 640x480 mp4 with the face pasted into the photo."""
from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from pcavs_live.cli.config import SAMPLE_PHOTO
from pcavs.alignment import FaceAligner, MOUTH_TARGET, read_rgb
from pcavs.constants import CROP_SIZE
from pcavs_live.pipeline.outputs import OUTPUTS
from pcavs_live.pipeline.outputs.vcam import CALL_SIZE
from stream.framing import (FitFramer, FramedSink, FramingError, PasteFramer, SharedFramer,
                            feathered_mask, make_framer, parse_size, size_for)
from tests.fakes import RecordingSink

SIZES = [(640, 480), (1280, 720), (480, 640)]


@pytest.fixture(scope="module")
def photo_and_face():
    """The bundled astronaut photo (512x512) and its alignment from the landmark sidecar."""
    photo = read_rgb(SAMPLE_PHOTO)
    return photo, FaceAligner(None).align_photo_file(SAMPLE_PHOTO)


def _letterbox_expected(photo: np.ndarray, size) -> tuple[np.ndarray, float, float, float]:
    """The photo scaled into `size`, computed independently: (canvas, scale, x0, y0)."""
    h, w = photo.shape[:2]
    scale = min(size[0] / w, size[1] / h)
    nw, nh = round(w * scale), round(h * scale)
    x0, y0 = (size[0] - nw) // 2, (size[1] - nh) // 2
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    canvas[y0:y0 + nh, x0:x0 + nw] = cv2.resize(photo, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1
                                                else cv2.INTER_LINEAR)
    return canvas, scale, (size[0] - w * scale) / 2, (size[1] - h * scale) / 2


# ------------------------------------------------------------------ sizes
def test_sizes_per_output():
    auto = {name: output.auto_size for name, output in OUTPUTS.items()}  # each output's size rule
    assert size_for("auto", auto["vcam"]) == CALL_SIZE == (640, 480)
    assert size_for("auto", auto["file"]) is None and size_for("auto", auto["webrtc"]) is None
    assert size_for("1280x720", auto["file"]) == (1280, 720) and size_for("1280x720", auto["vcam"]) == (1280, 720)
    assert size_for("native", auto["vcam"]) is None
    assert parse_size("224x224") is None                 # the crop itself: nothing to frame
    for bad in ("640*480", "0x480", "big"):
        with pytest.raises(FramingError, match="output.size"):
            parse_size(bad)
    with pytest.raises(FramingError, match="output.framing"):
        make_framer("stretch", (640, 480))


# ------------------------------------------------------------------ fit
@pytest.mark.parametrize("size", SIZES)
def test_fit_scales_the_crop_into_the_frame_with_bars(size):
    crop = np.zeros((CROP_SIZE, CROP_SIZE, 3), np.uint8)
    crop[..., 0] = 200
    crop[100:124, 100:124] = (0, 255, 0)                 # a green square at the centre
    out = FitFramer(size)(crop)
    assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8
    side = min(size)
    x0, y0 = (size[0] - side) // 2, (size[1] - side) // 2
    assert not out[:y0].any() and not out[y0 + side:].any()            # bars
    assert not out[:, :x0].any() and not out[:, x0 + side:].any()
    assert (out[y0 + 2:y0 + side - 2, x0 + 2:x0 + 10, 0] == 200).all()  # the crop, scaled
    green = np.argwhere(out[..., 1] > 128)
    assert np.allclose(green.mean(0), [size[1] / 2, size[0] / 2], atol=1.0)
    assert len(green) == pytest.approx((24 * side / CROP_SIZE) ** 2, rel=0.1)


# ------------------------------------------------------------------ paste
@pytest.mark.parametrize("size", SIZES)
def test_paste_is_the_photo_outside_the_mask_and_the_warped_crop_inside(photo_and_face, size):
    photo, face = photo_and_face
    framer = PasteFramer(photo, face.matrix, size)
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    out = framer(crop)
    assert out.shape == (size[1], size[0], 3)

    canvas, scale, ox, oy = _letterbox_expected(photo, size)
    np.testing.assert_array_equal(framer.canvas, canvas)
    outside = framer.mask == 0
    assert outside.any()
    np.testing.assert_array_equal(out[outside], canvas[outside])

    # crop → frame, composed here by hand: the alignment's matrix inverted (3x3), then the letterbox.
    m = np.vstack([face.matrix, [0, 0, 1]])
    letterbox = np.array([[scale, 0, ox], [0, scale, oy], [0, 0, 1]])
    back = (letterbox @ np.linalg.inv(m))[:2]
    warped = cv2.warpAffine(crop, back, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = framer.mask >= 1.0
    assert inside.sum() > 0.3 * (framer.mask > 0).sum()  # most of the face is fully generated
    diff = np.abs(out[inside].astype(int) - warped[inside].astype(int))
    assert diff.max() <= 1                               # fixed-point rounding of the two warps


def test_paste_puts_the_mouth_back_where_it_was_in_the_photo(photo_and_face):
    """The alignment maps the photo's mouth anchor exactly onto the template mouth (112,120): a dot
    drawn there in the generated crop must land on that anchor in the (letterboxed) photo."""
    photo, face = photo_and_face
    size = (1280, 720)
    crop = np.zeros((CROP_SIZE, CROP_SIZE, 3), np.uint8)
    mx, my = (int(v) for v in MOUTH_TARGET)
    crop[my - 3:my + 4, mx - 3:mx + 4] = 255
    out = PasteFramer(np.zeros_like(photo), face.matrix, size)(crop)
    _, scale, ox, oy = _letterbox_expected(photo, size)
    expected = face.anchors[2] * scale + (ox, oy)        # (x, y) in the frame
    ys, xs = np.nonzero(out[..., 0] > 128)
    assert abs(xs.mean() - expected[0]) < 1.0 and abs(ys.mean() - expected[1]) < 1.0


def test_pasting_the_photos_own_crop_gives_back_the_photo(photo_and_face):
    """The placeholder (the aligned photo itself) pasted back: the same picture, up to two resamplings."""
    photo, face = photo_and_face
    framer = PasteFramer(photo, face.matrix, (640, 480))
    out = framer(face.image)
    region = framer.mask > 0
    assert np.abs(out[region].astype(int) - framer.canvas[region].astype(int)).mean() < 4.0


@pytest.mark.parametrize("size", SIZES)
def test_paste_has_no_hard_edge(photo_and_face, size):
    """Black photo, white face: across the mask's border the picture must ramp, not step. A hard paste
    would jump by 255 between two neighbouring pixels."""
    photo, face = photo_and_face
    framer = PasteFramer(np.zeros_like(photo), face.matrix, size)
    out = framer(np.full((CROP_SIZE, CROP_SIZE, 3), 255, np.uint8))[..., 0].astype(int)
    step = max(np.abs(np.diff(out, axis=0)).max(), np.abs(np.diff(out, axis=1)).max())
    assert out.max() == 255 and step <= 40, step
    assert (framer.mask > 0).sum() > (framer.mask >= 1).sum()  # there is a feathered band


def test_feathered_mask_shape():
    mask = feathered_mask()
    assert mask.shape == (CROP_SIZE, CROP_SIZE) and mask.dtype == np.float32
    assert mask[CROP_SIZE // 2, CROP_SIZE // 2] == 1.0
    assert not mask[:6].any() and not mask[:, -6:].any()  # the crop's own border never shows
    assert np.abs(np.diff(mask, axis=1)).max() < 0.1


def test_paste_rejects_a_crop_of_the_wrong_size(photo_and_face):
    photo, face = photo_and_face
    with pytest.raises(ValueError, match="224x224"):
        PasteFramer(photo, face.matrix, (640, 480))(np.zeros((100, 100, 3), np.uint8))


# ------------------------------------------------------------------ sharing and the sink wrapper
class CountingFramer:
    size = (8, 6)

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, frame):
        self.calls += 1
        return np.full((6, 8, 3), frame[0, 0, 0], np.uint8)


def test_shared_framer_frames_each_distinct_picture_once_for_all_sinks():
    counting = CountingFramer()
    shared = SharedFramer(counting)
    a, b = RecordingSink(), FramedSink(RecordingSink(), shared)
    sinks = [FramedSink(a, shared), b]
    for s in sinks:
        s.open(224, 224, 25, 16000)
    assert a.opened == (8, 6, 25, 16000)
    first, second = np.full((4, 4, 3), 1, np.uint8), np.full((4, 4, 3), 2, np.uint8)
    for frame in (first, first, first, second):          # a repeated slot passes the same array
        for s in sinks:
            s.write(frame, np.zeros(640, np.float32), 0)
    assert counting.calls == 2 and shared.framed == 2
    assert [int(f[0, 0, 0]) for f in a.frames] == [1, 1, 1, 2]


@pytest.mark.slow
def test_session_records_a_640x480_mp4_with_the_face_pasted_into_the_photo(tmp_path):
    """Through SessionBuilder (stand-in checkpoints, a fast stand-in renderer): output.size and
    output.framing reach the recorder."""
    import av

    from pcavs_live.cli.config import load_config
    from pcavs_live.pipeline.session import RunOptions, SessionBuilder
    from tests.conftest import parity_weights_dir

    class WhiteFace:
        def render(self, mel_windows, pose_codes=None, times=None):
            return np.full((len(mel_windows), CROP_SIZE, CROP_SIZE, 3), 255, np.uint8)

    out = tmp_path / "call.mp4"
    config = load_config(None, {"model.checkpoint_dir": str(parity_weights_dir(0)), "output.targets": ["file"],
                                "output.file": str(out), "output.size": "640x480", "output.framing": "paste"})
    with SessionBuilder(config, RunOptions(realtime=False, max_seconds=0.4, status_interval_s=0),
                        renderer=WhiteFace()).build() as session:
        summary = session.run(threading.Event())
    assert summary.frames_out == 10
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 10 and frames[0].shape == (480, 640, 3)
    photo, face = read_rgb(SAMPLE_PHOTO), FaceAligner(None).align_photo_file(SAMPLE_PHOTO)
    framer = PasteFramer(photo, face.matrix, (640, 480))
    inside, outside = framer.mask >= 1, framer.mask == 0
    last = frames[-1].astype(int)
    assert last[inside].mean() > 245                     # the white generated face, after H.264
    assert np.abs(last[outside] - framer.canvas[outside].astype(int)).mean() < 4   # the photo around it
