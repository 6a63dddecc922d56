"""What can go wrong while aligning a face: one-line user errors, all catchable as `AlignmentError`."""
from __future__ import annotations

from pcavs_live.common.errors import UserError


class AlignmentError(UserError):
    """A user-fixable alignment problem; the message is one actionable line."""


class FaceNotFoundError(AlignmentError):
    """No face in a photo that must contain one."""


class LandmarkModelUnavailable(AlignmentError):
    """The landmark detector's weights are missing and could not be fetched."""


class LandmarksBusy(Exception):
    """A live pose frame's landmarks were not computed: the shared landmark batcher's queue was full or
    the wait ran past its bound (`pcavs.alignment.fan_batch`). Not a user error: the pose worker skips
    the frame (counted) and holds the last pose; the face track is kept."""
