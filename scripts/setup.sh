#!/usr/bin/env bash
# Set up pcavs-live on Debian 12 (or similar) with Python 3.11:
#   1. Debian packages (apt-get; needs root or password-less sudo, otherwise the list is printed),
#   2. the virtual environment .venv and the pinned Python packages (requirements.txt),
#   3. this project, installed editable (.venv/bin/pcavs-live; the code stays where it is),
#   4. with --dev: the test packages and lws, which has no wheel for Python 3.11 and is built with Cython;
#      and simple-whip-server (the WHIP tests' server): where apt cannot install it (it conflicts with a
#      non-Debian nodejs, e.g. NodeSource's), its Debian package is unpacked into .deps/simple-whip-server
#      and its Node dependencies installed there with npm (versions locked in scripts/simple-whip-server/).
# Idempotent: every step checks whether it is already done and skips itself, so a rerun takes seconds.
#
#   bash scripts/setup.sh          # what running needs
#   bash scripts/setup.sh --dev    # plus what the tests need (pytest, playwright, lws, chromium, pulseaudio...)
#
# Environment: PYTHON=/path/to/python3.11 picks the interpreter for a new .venv;
# SIMPLE_WHIP_SERVER_SYSTEM_DIR (default /usr/share/simple-whip-server) is where a system copy is looked for.
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

SUDO=()
can_apt=1
if ! command -v apt-get >/dev/null 2>&1; then
    can_apt=0
elif [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else can_apt=0; fi
fi
if (( ${#missing[@]} == 0 )); then
    skip "${PKGS[*]}"
else
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

# --------------------------------------------------------------------------- 1b. simple-whip-server (tests only)
# The WHIP tests (tests/janus_support.py) use the system copy when it works (Debian's package, or one with its
# own node_modules), else .deps/simple-whip-server: the same Debian package unpacked with dpkg-deb (apt-get
# download needs no install, so no conflict with a non-Debian nodejs) plus its Node dependencies from npm.
WHIP_SYSTEM="${SIMPLE_WHIP_SERVER_SYSTEM_DIR:-/usr/share/simple-whip-server}"
WHIP_LOCAL="$ROOT/.deps/simple-whip-server"
WHIP_LOCK="$ROOT/scripts/simple-whip-server"
whip_system_ok() {
    [[ -f "$WHIP_SYSTEM/src/server.js" ]] || return 1
    [[ -d "$WHIP_SYSTEM/node_modules/express" ]] && return 0
    [[ "$(dpkg-query -W -f='${db:Status-Status}' simple-whip-server 2>/dev/null || true)" == "installed" ]]
}
whip_local_want() { cat "$WHIP_LOCK/package.json" "$WHIP_LOCK/package-lock.json" | sha256sum | cut -d' ' -f1; }
whip_local_ok() {
    [[ -f "$WHIP_LOCAL/src/server.js" && -f "$WHIP_LOCAL/.setup.sha256" ]] \
        && [[ "$(cat "$WHIP_LOCAL/.setup.sha256")" == "$(whip_local_want)" ]]
}
install_whip_local() {
    local tmp
    tmp=$(mktemp -d)
    chmod 755 "$tmp"    # apt-get download writes as the _apt user where it can
    unpack_whip "$tmp" || true
    rm -rf "$tmp"
}
unpack_whip() {  # $1: an empty scratch folder
    local tmp=$1 deb
    if (( ! can_apt )); then
        warn "simple-whip-server is missing and apt-get cannot run here; install it by hand (see README: WHIP)"
        return 0
    fi
    command -v dpkg-deb >/dev/null 2>&1 || { warn "dpkg-deb is missing: cannot unpack simple-whip-server"; return 0; }
    command -v npm >/dev/null 2>&1 || { warn "npm is missing: cannot install simple-whip-server's Node modules"; return 0; }
    if ! (cd "$tmp" && run apt-get download -q simple-whip-server); then
        warn "apt-get download simple-whip-server failed; the WHIP tests will skip"
        return 0
    fi
    deb=$(find "$tmp" -maxdepth 1 -name 'simple-whip-server_*.deb' | head -n 1)
    [[ -n "$deb" ]] || { warn "apt-get download left no simple-whip-server .deb; the WHIP tests will skip"; return 0; }
    run dpkg-deb -x "$deb" "$tmp/root" || { warn "dpkg-deb could not unpack $deb"; return 0; }
    [[ -f "$tmp/root/usr/share/simple-whip-server/src/server.js" ]] \
        || { warn "the simple-whip-server package has no usr/share/simple-whip-server/src/server.js"; return 0; }
    rm -rf "$WHIP_LOCAL"
    mkdir -p "$(dirname "$WHIP_LOCAL")"
    cp -R "$tmp/root/usr/share/simple-whip-server" "$WHIP_LOCAL"
    rm -f "$WHIP_LOCAL/src/config.js"   # a link to /etc/simple-whip-server/config.js; the tests write their own
    cp "$WHIP_LOCK/package.json" "$WHIP_LOCK/package-lock.json" "$WHIP_LOCAL/"
    if ! (cd "$WHIP_LOCAL" && run npm ci --omit=dev --no-audit --no-fund); then
        warn "npm ci for simple-whip-server failed; the WHIP tests will skip"
        return 0
    fi
    whip_local_want > "$WHIP_LOCAL/.setup.sha256"
}
if (( DEV )); then
    step "simple-whip-server (the WHIP tests' server)"
    if whip_system_ok; then
        skip "simple-whip-server in $WHIP_SYSTEM"
    elif whip_local_ok; then
        skip "simple-whip-server in $WHIP_LOCAL"
    else
        install_whip_local
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
