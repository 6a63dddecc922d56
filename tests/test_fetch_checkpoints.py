"""pcavs_live.cli.fetch_checkpoints and the shared pcavs_live.common.download against a local HTTP server (no internet needed): the
upstream zip layout, Google Drive's confirm page, redirects, zip-slip archives, HTTP and network failures,
cut-short bodies, and the command line."""
from __future__ import annotations

import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

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
    every request path with its query string."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                outer.hits.append(self.path)
                status, headers, body = outer.routes.get(urlsplit(self.path).path, (404, {}, b"not found"))
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

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
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


# --------------------------------------------------------------------------- happy paths
def test_zip_with_top_folder_is_installed_flat(server, tmp_path, capsys):
    dest = tmp_path / "checkpoints" / "demo"
    status = fetch_checkpoints(server.serve("/demo.zip", DEMO_ZIP), dest, progress=True, describe=describe_stub)
    assert status == {n: "ok" for n in NETS}
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"latest_net_{n}.pth" for n in (*NETS, "D"))
    assert (dest / "latest_net_G.pth").read_bytes() == fake_pth("G")  # not the __MACOSX fork
    assert leftovers(dest.parent) == [] and leftovers(dest) == []
    err = capsys.readouterr().err
    assert "MB downloaded" in err and "A_sync" in err


def test_redirect_is_followed_and_existing_files_replaced(server, tmp_path):
    dest = tmp_path / "demo"
    dest.mkdir()
    (dest / "latest_net_G.pth").write_bytes(b"stale")
    server.serve("/demo.zip", DEMO_ZIP)
    url = server.serve("/moved", b"", ctype="text/plain", status=302, Location="/demo.zip")
    assert fetch_checkpoints(url, dest, progress=False, describe=describe_stub)["G"] == "ok"
    assert server.hits == ["/moved", "/demo.zip"]


def test_google_drive_confirm_page_is_followed(server, tmp_path):
    server.serve("/download", DEMO_ZIP)
    page = (b'<html><body><p>Google Drive can\'t scan this file for viruses.</p>'
            b'<form id="download-form" action="/download" method="get">'
            b'<input type="submit" value="Download anyway"/>'
            b'<input type="hidden" name="id" value="FILEID"><input type="hidden" name="export" value="download">'
            b'<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-1"></form>'
            b'</body></html>')
    url = server.serve("/uc", page, ctype="text/html; charset=utf-8")
    status = fetch_checkpoints(url + "?export=download&id=FILEID", tmp_path / "demo", False, describe_stub)
    assert status == {n: "ok" for n in NETS}
    query = parse_qs(urlsplit(server.hits[-1]).query)
    assert urlsplit(server.hits[-1]).path == "/download"
    assert query == {"id": ["FILEID"], "export": ["download"], "confirm": ["t"], "uuid": ["u-1"]}


def test_drive_view_links_become_download_links():
    view = "https://drive.google.com/file/d/1Zehr3JLIpzdg2S5zZrhIbpYPKF-4gKU_/view?usp=sharing"
    assert fc.drive_download_url(view) == \
        "https://drive.google.com/uc?export=download&id=1Zehr3JLIpzdg2S5zZrhIbpYPKF-4gKU_"
    assert fc.drive_download_url("http://127.0.0.1:1/x.zip") == "http://127.0.0.1:1/x.zip"


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


def test_html_without_confirm_form_fails_clearly(server, tmp_path):
    url = server.serve("/quota", b"<html><body>Too many users have viewed or downloaded this file</body></html>",
                       ctype="text/html")
    with pytest.raises(CheckpointFetchError, match="web page instead of the zip") as info:
        fetch_checkpoints(url, tmp_path / "demo", False, describe_stub)
    assert "by hand" in info.value.hint


def test_shared_downloader_never_leaves_a_partial_file(server, tmp_path):
    """pcavs_live.common.download (also used for the face landmark weights): a body shorter than its Content-Length or
    an HTML page keeps the old file and leaves no .part file; a whole body replaces the file."""
    from pcavs_live.common.download import DownloadError, download

    dest = tmp_path / "weights.pth"
    dest.write_bytes(b"old")
    short = server.serve("/w.pth", b"x" * 1000, ctype="application/octet-stream", **{"Content-Length": "5000"})
    page = server.serve("/login", b"<html>sign in</html>", ctype="text/html")
    with pytest.raises(DownloadError, match=r"could not download http://127\.0\.0\.1:\d+/w\.pth: ") as info:
        download(short, dest, timeout_s=10)
    assert "\n" not in str(info.value) and isinstance(info.value, UserError)
    with pytest.raises(DownloadError, match="web page instead of the file"):
        download(page, dest, timeout_s=10)
    assert dest.read_bytes() == b"old" and leftovers(tmp_path) == []
    assert download(server.serve("/ok.pth", b"new" * 10, ctype="application/octet-stream"), dest) == 30
    assert dest.read_bytes() == b"new" * 10 and leftovers(tmp_path) == []


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
