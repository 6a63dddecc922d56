"""Where pcavs-live's files are: in a source checkout, and in a package installed with pip.

Two kinds of files, two folders:

* Bundled, read-only: `configs/default.toml` and the sample in `assets/sample/`. The wheel installs them
  beside the code (site-packages/configs, site-packages/assets), the same layout as the checkout, so
  `BUNDLED_ROOT` is simply the folder holding the `pcavs_live` package in both cases.
* Written by the user or for the user: checkpoints (`checkpoints/demo`), recordings (`out/`). In a
  checkout they stay in the checkout, as before. An installed package must not write into
  site-packages (it may be read-only, and a reinstall should not touch a user's 600 MB of weights), so
  there they live in a per-user folder, `HOME_DIR` (platformdirs' user data folder unless $PCAVS_LIVE_HOME).

A relative path in a config file names a file in `HOME_DIR`, or else a bundled file of that name: that
is how the default `identity.photo = "assets/sample/astronaut.png"` finds the installed sample while
`checkpoint_dir = "checkpoints/demo"` lands in the user's folder.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import platformdirs

HOME_ENV = "PCAVS_LIVE_HOME"  # overrides HOME_DIR (a checkout's or the per-user one)
APP_NAME = "pcavs-live"

BUNDLED_ROOT = Path(__file__).resolve().parents[2]  # holds pcavs_live/, configs/, assets/ (checkout or site-packages)
# A wheel never contains pyproject.toml: its presence means we run from the source tree (or an editable install).
IS_CHECKOUT = (BUNDLED_ROOT / "pyproject.toml").is_file()


def user_data_dir() -> Path:
    """The per-user folder an installed pcavs-live writes to, by this OS's convention (platformdirs: %LOCALAPPDATA%
    on Windows, ~/Library/Application Support on macOS, $XDG_DATA_HOME or ~/.local/share elsewhere)."""
    return platformdirs.user_data_path(APP_NAME, appauthor=False)


def home_dir(env: Mapping[str, str] | None = None) -> Path:
    """The base of relative paths in config files: $PCAVS_LIVE_HOME, else the checkout, else the user's folder."""
    env = os.environ if env is None else env
    if env.get(HOME_ENV):
        return Path(env[HOME_ENV]).expanduser().resolve()
    return BUNDLED_ROOT if IS_CHECKOUT else user_data_dir()


HOME_DIR = home_dir()
