#!/usr/bin/env bash
# Set up pcavs-live on Debian 12 (or similar) with Python 3.11:
#   1. Debian packages (apt-get; needs root or password-less sudo, otherwise the list is printed),
#   2. the virtual environment .venv and the pinned Python packages (requirements.txt),
#   3. this project, installed editable (.venv/bin/pcavs-live; the code stays where it is),
#   4. with --dev: the test packages and lws, which has no wheel for Python 3.11 and is built with Cython.
# Idempotent: every step checks whether it is already done and skips itself, so a rerun takes seconds.
#
#   bash scripts/setup.sh          # what running needs
#   bash scripts/setup.sh --dev    # plus what the tests need (pytest, playwright, lws, chromium, pulseaudio...)
#
# Environment: PYTHON=/path/to/python3.11 picks the interpreter for a new .venv.
# Note: torch is pinned to the PyPI build, a multi-GB download (CUDA libraries included) on first run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
LWS_VERSION=1.2.8
CYTHON_VERSION=3.3.1

# Runtime: PortAudio for sounddevice; libGL/GLib for opencv-python; venv support.
RUNTIME_PKGS=(libportaudio2 libgl1 libglib2.0-0 python3-venv)
# Tests: a C toolchain and Python headers to build lws, speech synthesis and audio tools, the browser for
# the WebRTC viewer test, a PulseAudio server for virtual microphone tests, Janus + simple-whip-server
# for the WHIP publishing tests.
DEV_PKGS=(gcc libc6-dev python3-dev espeak-ng sox chromium pulseaudio pulseaudio-utils
          libasound2-plugins  # alsa plugins: PortAudio → PulseAudio
          janus simple-whip-server)

DEV=0
usage() { sed -n '2,13s/^# \{0,1\}//p' "$0"; }
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option '$arg' (use --dev or --help)" >&2; exit 2 ;;
    esac
done

step() { printf '\n==> %s\n' "$*"; }
skip() { printf '    already done: %s\n' "$*"; }
run() { printf '    + %s\n' "$*"; "$@"; }
warn() { printf 'setup.sh: warning: %s\n' "$*" >&2; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

PIP_FLAGS=(--disable-pip-version-check --no-input)
if [[ "${CI:-}" == "true" || ! -t 1 ]]; then PIP_FLAGS+=(--progress-bar off); fi
pip_install() { run "$VPY" -m pip install "${PIP_FLAGS[@]}" "$@"; }

# --------------------------------------------------------------------------- 1. Debian packages
step "Debian packages"
PKGS=("${RUNTIME_PKGS[@]}")
if (( DEV )); then PKGS+=("${DEV_PKGS[@]}"); fi

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${PKGS[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        [[ "$status" == "installed" ]] || missing+=("$pkg")
    done
else
    missing=("${PKGS[@]}")
fi

if (( ${#missing[@]} == 0 )); then
    skip "${PKGS[*]}"
else
    SUDO=()
    can_apt=1
    if ! command -v apt-get >/dev/null 2>&1; then
        can_apt=0
    elif [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else can_apt=0; fi
    fi
    if (( can_apt )); then
        export DEBIAN_FRONTEND=noninteractive
        if ! { run "${SUDO[@]}" apt-get update -q \
               && run "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; }; then
            # One package apt cannot install (e.g. simple-whip-server beside a non-Debian nodejs) must not
            # keep the others out: try them one at a time and name the ones that still fail.
            failed=()
            for pkg in "${missing[@]}"; do
                run "${SUDO[@]}" apt-get install -y -q --no-install-recommends "$pkg" || failed+=("$pkg")
            done
            (( ${#failed[@]} == 0 )) || warn "apt-get failed; install these packages by hand: ${failed[*]}"
        fi
    else
        warn "cannot run apt-get here (no apt-get, or not root and no password-less sudo)."
        warn "install these packages by hand, then rerun:  sudo apt-get install ${missing[*]}"
    fi
fi

# --------------------------------------------------------------------------- 2. virtual environment
step "Python virtual environment ($VENV)"
is_py311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; }
if [[ -x "$VPY" ]]; then
    is_py311 "$VPY" || die "$VPY is not a working Python 3.11; remove .venv (rm -rf .venv) and rerun"
    skip "$("$VPY" --version)"
else
    PY="${PYTHON:-}"
    if [[ -z "$PY" ]]; then
        if command -v python3.11 >/dev/null 2>&1; then PY=python3.11
        elif command -v python3 >/dev/null 2>&1 && is_py311 python3; then PY=python3
        else die "Python 3.11 not found (Debian 12: apt-get install python3 python3-venv), or set PYTHON=/path/to/python3.11"
        fi
    fi
    is_py311 "$PY" || die "$PY is not Python 3.11"
    run "$PY" -m venv "$VENV" || die "could not create $VENV (on Debian: apt-get install python3-venv)"
fi

# --------------------------------------------------------------------------- 3. Python packages
# A stamp holds the hash of the requirement files that were installed, so a rerun skips pip (seconds of
# dependency resolution) unless the files changed or the environment lost its packages.
have_modules() {  # cheap presence check (find_spec does not import: importing torch alone takes seconds)
    "$VPY" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' "$@"
}
install_requirements() {  # $1: name, $2: modules that must be present, $3...: requirement files
    local name=$1 modules=$2; shift 2
    local stamp="$VENV/.setup-$name.sha256" want
    want=$(cat "$@" | sha256sum | cut -d' ' -f1)
    # shellcheck disable=SC2086  # $modules is a word list on purpose
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && have_modules $modules; then
        skip "$*"
        return
    fi
    pip_install -r "${@: -1}"
    echo "$want" > "$stamp"
}

step "Python packages (requirements.txt)"
install_requirements runtime "torch torchvision numpy scipy librosa soundfile cv2 face_alignment skimage aiohttp aiortc av sounddevice pyvirtualcam" requirements.txt
if (( DEV )); then
    step "Python test packages (requirements-dev.txt)"
    install_requirements dev "pytest playwright" requirements.txt requirements-dev.txt
fi

# --------------------------------------------------------------------------- 4. the project itself
# Editable (-e): `.venv/bin/pcavs-live` runs this checkout's code, so run_live.py and the command are one
# program. --no-deps: step 3 installed the pinned dependencies. The venv's setuptools builds it when it
# can (>= 70.1 has bdist_wheel built in; torch pulls in a recent one), else pip fetches one.
step "pcavs-live (editable install: .venv/bin/pcavs-live)"
stamp="$VENV/.setup-project.sha256"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
   && "$VPY" -c 'import importlib.metadata as m; m.distribution("pcavs-live")' >/dev/null 2>&1; then
    skip "pcavs-live $("$VPY" -c 'import importlib.metadata as m; print(m.version("pcavs-live"))')"
else
    isolation=()
    if "$VPY" -c 'import setuptools.command.bdist_wheel' >/dev/null 2>&1; then isolation=(--no-build-isolation); fi
    pip_install --no-deps "${isolation[@]}" -e .
    echo "$want" > "$stamp"
fi

# --------------------------------------------------------------------------- 5. lws (tests only)
if (( DEV )); then
    step "lws $LWS_VERSION (built with Cython; the tests compare our STFT with it)"
    if "$VPY" -c "import lws" >/dev/null 2>&1; then
        skip "lws $("$VPY" -c 'import importlib.metadata as m; print(m.version("lws"))')"
    else
        # lws 1.2.8 ships C sources generated by an old Cython that do not compile on Python 3.11;
        # LWS_USE_CYTHON=1 regenerates them, and --no-build-isolation lets that see Cython and numpy.
        pip_install "Cython==$CYTHON_VERSION"
        LWS_USE_CYTHON=1 pip_install --no-build-isolation "lws==$LWS_VERSION"
    fi
fi

# --------------------------------------------------------------------------- check
step "Check"
"$VPY" - "$DEV" <<'EOF'
import importlib.metadata as md, sys
import torch  # noqa: F401  (the huge one: fail loudly here, not in a test)
names = ["torch", "torchvision", "numpy", "librosa", "opencv-python", "aiortc", "av"]
if sys.argv[1] == "1":
    import lws  # noqa: F401  (the one that is built here)
    names.append("lws")
print("    " + ", ".join(f"{n} {md.version(n)}" for n in names))
EOF
# What this machine still lacks (checkpoints, a virtual camera...) and the command for each; informative
# here, so its exit code (non-zero while the checkpoints are not fetched yet) does not fail the set-up.
"$VPY" run_live.py doctor || true
echo "setup complete."
