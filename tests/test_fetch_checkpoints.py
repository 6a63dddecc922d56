"""pcavs_live.cli.fetch_checkpoints and the shared pcavs_live.common.download against a local HTTP server (no
internet needed): the upstream zip layout, Google Drive's confirm page through gdown's own code, redirects,
zip-slip archives, HTTP and network failures, cut-short bodies (restarted by pooch, resumed by gdown),
corrupted files refused by their hash, and the command line."""
from __future__ import annotations

import hashlib
import importlib
import io
import random
import re
import threading
import tomllib
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests.adapters

from pcavs_live.common.errors import UserError
from pcavs_live.cli import fetch_checkpoints as fc
from pcavs_live.cli.fetch_checkpoints import CheckpointFetchError, extract_checkpoints, fetch_checkpoints

NETS = ("G", "V", "E", "A_sync")


def fake_pth(name: str) -> bytes:
    return f"fake weights for {name}\n".encode() * 50


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


DEMO_ZIP = make_zip({
    "demo/": b"",
    **{f"demo/latest_net_{n}.pth": fake_pth(n) for n in (*NETS, "D")},
    "demo/readme.txt": b"not a checkpoint",
    "__MACOSX/demo/._latest_net_G.pth": b"resource fork junk",
})


class Server:
    """A tiny HTTP server in a thread. `routes` maps a path to (status, headers, body); `hits` records
    every request path with its query string, `ranges` the Range header of each request (or None).

    A path in `cut_once` is answered the first time with its full Content-Length but only half its body
    (a dropped connection); later requests get the rest when they ask for a byte range."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hits: list[str] = []
        self.ranges: list[str | None] = []
        self.cut_once: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                outer.hits.append(self.path)
                outer.ranges.append(self.headers.get("Range"))
                path = urlsplit(self.path).path
                status, headers, body = outer.routes.get(path, (404, {}, b"not found"))
                headers = {"Content-Length": str(len(body)), **headers}
                sent = body
                if path in outer.cut_once:
                    outer.cut_once.discard(path)
                    sent = body[:len(body) // 2]
                elif (match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")) and status == 200:
                    start = int(match.group(1))
                    status, sent = 206, body[start:]
                    headers.update({"Content-Length": str(len(sent)),
                                    "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(sent)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="test-http",
                                       daemon=True)

    def serve(self, path: str, body: bytes, ctype: str = "application/zip", status: int = 200,
              **headers: str) -> str:
        self.routes[path] = (status, {"Content-Type": ctype, **headers}, body)
        return self.base + path


@pytest.fixture
def server():
    srv = Server()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join(timeout=5)


def describe_stub(dest: Path) -> dict[str, str]:
    """Stands in for pcavs.checkpoints.describe_checkpoints: 'ok' when the file holds our fake bytes."""
    out = {}
    for net in NETS:
        path = dest / f"latest_net_{net}.pth"
        out[net] = "missing" if not path.is_file() else ("ok" if path.read_bytes() == fake_pth(net) else "invalid")
    return out


def leftovers(folder: Path) -> list[str]:
    """Temporary files: ours and gdown's (`.part`), pooch's (`tmp…`)."""
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name or p.name.startswith("tmp"))


class ToServer(requests.adapters.HTTPAdapter):
    """Sends every https request of a requests session to the local server instead (same path and query),
    so gdown's own Drive code runs against Drive-like pages: gdown has no base-URL setting."""

    def __init__(self, base: str) -> None:
        super().__init__()
        self.base = base

    def send(self, request, **kwargs):
        parts = urlsplit(request.url)
        local = request.copy()
        local.url = f"{self.base}{parts.path}" + (f"?{parts.query}" if parts.query else "")
        local.headers["X-Original-Host"] = parts.hostname
        return super().send(local, **kwargs)


@pytest.fixture
def drive(server, monkeypatch):
    """The local server standing in for drive.google.com and drive.usercontent.google.com (gdown's session
    gets the ToServer adapter; everything else in gdown is its own code)."""
    gdown_download = importlib.import_module("gdown.download")
    real_session = gdown_download._get_session

    def local_session(**kwargs):
        session, cookies_file = real_session(**kwargs)
        session.mount("https://", ToServer(server.base))
        return session, cookies_file

    monkeypatch.setattr(gdown_download, "_get_session", local_session)
    return server


# Google Drive's "can't scan this file for viruses" page as Drive serves it (one line, as gdown reads it).
DRIVE_WARNING = (
    '<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>\n'
    '<div class="uc-main"><p class="uc-warning-subcaption">Google Drive can\'t scan this file for viruses.</p>'
    '<form id="download-form" action="https://drive.usercontent.google.com/download" method="get">'
    '<input type="submit" id="uc-download-link" value="Download anyway"/>'
    '<input type="hidden" name="id" value="FILEID"><input type="hidden" name="export" value="download">'
    '<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-1"></form></div>\n'
    '</body></html>\n').encode()
DRIVE_QUOTA = (
    '<!DOCTYPE html><html><body>\n<div class="uc-main"><p class="uc-error-caption">Sorry, you can\'t view or '
    'download this file at this time.</p>\n<p class="uc-error-subcaption">Too many users have viewed or downloaded '
    'this file recently. Please try accessing the file again later.</p></div>\n</body></html>\n').encode()


# --------------------------------------------------------------------------- happy paths
def test_zip_with_top_folder_is_installed_flat(server, tmp_path, capsys):
    dest = tmp_path / "checkpoints" / "demo"
    status = fetch_checkpoints(server.serve("/demo.zip", DEMO_ZIP), dest, progress=True, describe=describe_stub)
    assert status == {n: "ok" for n in NETS}
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"latest_net_{n}.pth" for n in (*NETS, "D"))
    assert (dest / "latest_net_G.pth").read_bytes() == fake_pth("G")  # not the __MACOSX fork
    assert leftovers(dest.parent) == [] and leftovers(dest) == []
    err = capsys.readouterr().err
    assert "downloading" in err and "A_sync" in err
    assert f"SHA-256 of demo.zip: {hashlib.sha256(DEMO_ZIP).hexdigest()}" in err  # to pin it in the registry


def test_redirect_is_followed_and_existing_files_replaced(server, tmp_path):
    dest = tmp_path / "demo"
    dest.mkdir()
    (dest / "latest_net_G.pth").write_bytes(b"stale")
    server.serve("/demo.zip", DEMO_ZIP)
    url = server.serve("/moved", b"", ctype="text/plain", status=302, Location="/demo.zip")
    assert fetch_checkpoints(url, dest, progress=False, describe=describe_stub)["G"] == "ok"
    assert server.hits == ["/moved", "/demo.zip"]


@pytest.mark.parametrize("link", ["https://drive.google.com/uc?export=download&id=FILEID",
                                  "https://drive.google.com/file/d/FILEID/view?usp=sharing"])
def test_google_drive_confirm_page_is_passed_by_gdown(drive, tmp_path, link):
    """Both link forms users paste: gdown finds the file id, reads the virus-scan page's form and follows it
    to drive.usercontent.google.com."""
    drive.serve("/uc", DRIVE_WARNING, ctype="text/html; charset=utf-8")
    drive.serve("/download", DEMO_ZIP, **{"Content-Disposition": 'attachment; filename="demo.zip"'})
    status = fetch_checkpoints(link, tmp_path / "demo", False, describe_stub)
    assert status == {n: "ok" for n in NETS}
    assert urlsplit(drive.hits[0]).path == "/uc" and parse_qs(urlsplit(drive.hits[0]).query)["id"] == ["FILEID"]
    assert urlsplit(drive.hits[-1]).path == "/download"
    query = parse_qs(urlsplit(drive.hits[-1]).query)
    assert {k: query[k] for k in ("id", "export", "confirm", "uuid")} == \
        {"id": ["FILEID"], "export": ["download"], "confirm": ["t"], "uuid": ["u-1"]}
    assert leftovers(tmp_path) == []


def test_google_drive_quota_page_is_one_line_with_manual_hint(drive, tmp_path):
    drive.serve("/uc", DRIVE_QUOTA, ctype="text/html; charset=utf-8")
    with pytest.raises(CheckpointFetchError, match="Google Drive would not hand out the file") as info:
        fetch_checkpoints("https://drive.google.com/uc?export=download&id=FILEID", tmp_path / "demo", False,
                          describe_stub)
    assert "\n" not in str(info.value) and "--zip" in info.value.hint
    assert leftovers(tmp_path) == []


def test_google_drive_transfer_cut_short_is_resumed(drive, tmp_path):
    """gdown asks for the missing bytes only (a Range request from what it had received, in 512 KB chunks:
    hence a zip of a few MB), and the zip installs whole."""
    filler = random.Random(0).randbytes(3 << 20)  # incompressible
    big = make_zip({f"demo/latest_net_{n}.pth": fake_pth(n) for n in NETS} | {"demo/filler.bin": filler})
    drive.serve("/uc", DRIVE_WARNING, ctype="text/html; charset=utf-8")
    drive.serve("/download", big, **{"Content-Disposition": 'attachment; filename="demo.zip"'})
    drive.cut_once.add("/download")
    status = fetch_checkpoints("https://drive.google.com/uc?export=download&id=FILEID", tmp_path / "demo", False,
                               describe_stub)
    assert status == {n: "ok" for n in NETS}
    assert [urlsplit(h).path for h in drive.hits] == ["/uc", "/download", "/download"]
    assert drive.ranges[1] is None
    start = int(re.fullmatch(r"bytes=(\d+)-", drive.ranges[2]).group(1))
    assert 0 < start <= len(big) // 2
    assert leftovers(tmp_path) == []


def test_plain_http_transfer_cut_short_is_restarted(server, tmp_path):
    """pooch starts a cut-short download again from the first byte (after a second's pause) and keeps only
    a whole file whose hash matches."""
    from pcavs_live.common.download import download

    body = b"weights" * 5000
    url = server.serve("/w.pth", body, ctype="application/octet-stream")
    server.cut_once.add("/w.pth")
    dest = tmp_path / "w.pth"
    assert download(url, dest, sha256=hashlib.sha256(body).hexdigest(), timeout_s=10) == len(body)
    assert dest.read_bytes() == body
    assert server.hits == ["/w.pth", "/w.pth"] and server.ranges == [None, None]
    assert leftovers(tmp_path) == []


def test_registry_lists_every_downloaded_file_with_its_url():
    """The registry (pooch's format) is the one list: the face weights with full SHA-256s that agree with
    the digits in their names, and demo.zip at the URL configs/default.toml downloads it from."""
    from pcavs.alignment import LANDMARK_MODEL_FILES, LANDMARK_WEIGHTS
    from pcavs_live.common.download import REGISTRY_FILE, load_registry

    registry = load_registry()
    assert set(registry) == {*LANDMARK_MODEL_FILES, "demo.zip"}
    for name, weight in LANDMARK_WEIGHTS.items():
        assert registry[name] == weight and LANDMARK_MODEL_FILES[name] == weight.url
        assert re.fullmatch(r"[0-9a-f]{64}", weight.sha256) and weight.sha256.startswith(name.split("-")[1][:10])
    default = tomllib.loads((REGISTRY_FILE.parents[2] / "configs" / "default.toml").read_text())
    assert registry["demo.zip"].url == default["model"]["checkpoint_url"]


# --------------------------------------------------------------------------- refusals and failures
@pytest.mark.parametrize("evil", ["demo/../../evil/latest_net_G.pth", "/tmp/latest_net_G.pth",
                                  "..\\latest_net_G.pth", "C:/latest_net_G.pth"])
def test_path_traversal_archive_is_rejected_whole(server, tmp_path, evil):
    body = make_zip({f"demo/latest_net_{n}.pth": fake_pth(n) for n in NETS} | {evil: b"pwned"})
    dest = tmp_path / "a" / "b" / "demo"
    with pytest.raises(CheckpointFetchError, match="unsafe path") as info:
        fetch_checkpoints(server.serve("/evil.zip", body), dest, False, describe_stub)
    assert "\n" not in str(info.value) and info.value.hint
    assert not dest.exists() or list(dest.iterdir()) == []   # nothing extracted, not even the good files
    assert not (tmp_path / "evil").exists()
    assert leftovers(dest.parent) == []


def test_http_404_is_one_line_with_manual_hint(server, tmp_path):
    dest = tmp_path / "demo"
    with pytest.raises(CheckpointFetchError) as info:
        fetch_checkpoints(server.base + "/missing.zip", dest, False, describe_stub)
    assert "HTTP 404" in str(info.value) and "/missing.zip" in str(info.value)
    assert "\n" not in str(info.value)
    assert "drive.google.com/file/d/1Zehr3JLIpzdg2S5zZrhIbpYPKF-4gKU_" in info.value.hint
    assert "--zip" in info.value.hint and str(dest) in info.value.hint
    assert isinstance(info.value, UserError)
    assert leftovers(tmp_path) == []


def test_connection_refused_is_a_user_error(tmp_path):
    srv = Server()  # bound but never served: grab a free port, then close it
    url = srv.base + "/demo.zip"
    srv.httpd.server_close()
    with pytest.raises(CheckpointFetchError, match=r"could not download http://127\.0\.0\.1:\d+/demo\.zip: "):
        fetch_checkpoints(url, tmp_path / "demo", False, describe_stub)


def test_html_instead_of_the_zip_fails_clearly(server, tmp_path):
    url = server.serve("/quota", b"<html><body>Too many users have viewed or downloaded this file</body></html>",
                       ctype="text/html")
    with pytest.raises(CheckpointFetchError, match="web page instead of demo.zip") as info:
        fetch_checkpoints(url, tmp_path / "demo", False, describe_stub)
    assert "by hand" in info.value.hint


def test_shared_downloader_never_leaves_a_partial_file(server, tmp_path):
    """pcavs_live.common.download (also used for the face landmark weights): a body shorter than its
    Content-Length, a corrupted body (wrong SHA-256) or an HTML page keeps the old file and leaves no
    temporary file; a whole body with the right hash replaces the file, and a second call downloads nothing."""
    from pcavs_live.common.download import DownloadError, download

    good = b"new" * 10
    digest = hashlib.sha256(good).hexdigest()
    dest = tmp_path / "weights.pth"
    dest.write_bytes(b"old")
    short = server.serve("/w.pth", b"x" * 1000, ctype="application/octet-stream", **{"Content-Length": "5000"})
    with pytest.raises(DownloadError, match=r"could not download http://127\.0\.0\.1:\d+/w\.pth: .*cut short") as info:
        download(short, dest, sha256=digest, timeout_s=10)
    assert "\n" not in str(info.value) and isinstance(info.value, UserError)
    corrupt = server.serve("/corrupt.pth", b"new" * 9 + b"NEW", ctype="application/octet-stream")
    with pytest.raises(DownloadError, match="SHA-256 does not match"):
        download(corrupt, dest, sha256=digest, timeout_s=10)
    page = server.serve("/login", b"<html>sign in</html>", ctype="text/html")
    with pytest.raises(DownloadError, match="web page instead of page.html"):
        download(page, tmp_path / "page.html", timeout_s=10)
    assert dest.read_bytes() == b"old" and leftovers(tmp_path) == [] and not (tmp_path / "page.html").exists()
    assert download(server.serve("/ok.pth", good, ctype="application/octet-stream"), dest, sha256=digest) == 30
    assert dest.read_bytes() == good and leftovers(tmp_path) == []
    hits = len(server.hits)
    assert download("http://127.0.0.1:9/ok.pth", dest, sha256=digest) == 30  # verified in place: no network
    assert len(server.hits) == hits


@pytest.mark.parametrize("body, pattern", [
    (b"this is not a zip file at all", "not a readable zip archive"),
    (make_zip({"demo/notes.txt": b"x", "demo/model.pth": b"y"}), r"contains no latest_net_\*\.pth"),
    (make_zip({"a/latest_net_G.pth": b"1", "b/latest_net_G.pth": b"2"}), "two copies of latest_net_G.pth"),
])
def test_bad_archives(server, tmp_path, body, pattern):
    with pytest.raises(CheckpointFetchError, match=pattern):
        fetch_checkpoints(server.serve("/x.zip", body), tmp_path / "demo", False, describe_stub)
    assert leftovers(tmp_path) == []


def test_partial_archive_reports_missing_networks(server, tmp_path):
    body = make_zip({f"demo/latest_net_{n}.pth": fake_pth(n) for n in ("G", "V", "E")})
    status = fetch_checkpoints(server.serve("/part.zip", body), tmp_path / "demo", False, describe_stub)
    assert status == {"G": "ok", "V": "ok", "E": "ok", "A_sync": "missing"}


def test_real_describe_checkpoints_flags_fake_files(tmp_path):
    """With the real verifier (pcavs.checkpoints), bytes that are not a state_dict must not pass."""
    checkpoints = pytest.importorskip("pcavs.checkpoints")
    zip_path = tmp_path / "demo.zip"
    zip_path.write_bytes(make_zip({f"demo/latest_net_{n}.pth": fake_pth(n) for n in ("V", "E")}))
    status = fc.install_zip(zip_path, tmp_path / "demo", describe=checkpoints.describe_checkpoints)
    assert status["G"] == status["A_sync"] == "missing"
    assert all(status[n].startswith("invalid") for n in ("V", "E"))
    assert fc._missing(status) == list(NETS)


# --------------------------------------------------------------------------- command line
def test_cli_zip_install_ok_and_incomplete(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fc, "_describe", describe_stub)
    full, partial = tmp_path / "full.zip", tmp_path / "partial.zip"
    full.write_bytes(DEMO_ZIP)
    partial.write_bytes(make_zip({"latest_net_G.pth": fake_pth("G")}))

    assert fc.main(["--zip", str(full), "--dest", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert all(f"{n}" in out for n in NETS) and "missing" not in out

    assert fc.main(["--zip", str(partial), "--dest", str(tmp_path / "bad")]) == 2
    captured = capsys.readouterr()
    assert "A_sync" in captured.out and "missing" in captured.out
    assert captured.err.startswith("error: ") and "lacks usable V, E, A_sync" in captured.err


def test_cli_skips_download_when_complete(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fc, "_describe", describe_stub)
    dest = tmp_path / "demo"
    extract_checkpoints(_write(tmp_path / "d.zip", DEMO_ZIP), dest)
    # An unreachable URL proves no download is attempted.
    assert fc.main(["--dest", str(dest), "--url", "http://127.0.0.1:9/never.zip"]) == 0
    assert "already complete" in capsys.readouterr().out


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_fetch_command_installs_a_hand_downloaded_zip_offline(tmp_path, monkeypatch, capsys):
    """`pcavs-live fetch --zip demo.zip`: no network needed; a zip-slip archive is refused (one error line,
    nothing written) and the by-hand line is printed again."""
    from pcavs_live.cli import fetch
    from pcavs_live.cli.main import main

    monkeypatch.setattr(fetch, "_describe", describe_stub)
    monkeypatch.setattr(fetch, "landmark_files", dict)  # the face weights are another test's business
    good = _write(tmp_path / "demo.zip", DEMO_ZIP)
    dest = tmp_path / "ck"
    args = ["fetch", "-q", "--checkpoints", str(dest), "--set", "model.checkpoint_url=http://127.0.0.1:9/demo.zip"]
    assert main([*args, "--zip", str(good)]) == 0, capsys.readouterr()
    assert describe_stub(dest) == {n: "ok" for n in NETS}
    assert "installed, verified" in capsys.readouterr().out

    evil = _write(tmp_path / "evil.zip", make_zip({"demo/latest_net_G.pth": fake_pth("G"),
                                                   "../../latest_net_V.pth": b"pwned"}))
    other = tmp_path / "other"
    assert main(["fetch", "-q", "--checkpoints", str(other), "--zip", str(evil)]) == 2
    captured = capsys.readouterr()
    assert "unsafe path '../../latest_net_V.pth'" in captured.out and "fetch --zip" in captured.out
    assert captured.err.startswith("error: ") and captured.err.count("error:") == 1
    assert not other.exists() and not (tmp_path.parent / "latest_net_V.pth").exists()
