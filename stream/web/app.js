// pcavs-live viewer: one receive-only WebRTC connection (video + audio) and a once-a-second /stats poll.
// No external scripts: the page must work on an offline machine.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const video = document.getElementById("video");
const unmute = document.getElementById("unmute");
const statusEl = document.getElementById("status");
const statsBody = document.querySelector("#stats tbody");
let pc = null;
let retryTimer = null;

function setStatus(text, bad) {
  statusEl.textContent = text;
  statusEl.classList.toggle("bad", !!bad);
}

function waitForIceGathering(conn, ms) {
  // aiortc answers without trickle ICE, so send the offer with its candidates included.
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { conn.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (conn.iceGatheringState === "complete") done(); };
    conn.addEventListener("icegatheringstatechange", check);
    setTimeout(done, ms);
  });
}

async function iceServers() {
  // The STUN/TURN servers configured on the server (server.stun_url, server.turn_*), so that a viewer
  // behind NAT gathers the same kinds of candidates; none when the request fails.
  try {
    const resp = await fetch("ice" + (token ? "?token=" + encodeURIComponent(token) : ""), { cache: "no-store" });
    if (resp.ok) return (await resp.json()).iceServers || [];
  } catch (err) { /* server restarting: host candidates only */ }
  return [];
}

function scheduleReconnect(why) {
  setStatus(why + " — reconnecting in 3 s", true);
  if (retryTimer === null) retryTimer = setTimeout(() => { retryTimer = null; connect(); }, 3000);
}

async function connect() {
  if (pc) { try { pc.close(); } catch (e) { /* already closed */ } }
  setStatus("connecting…");
  const conn = new RTCPeerConnection({ iceServers: await iceServers() });
  pc = conn;
  conn.addTransceiver("video", { direction: "recvonly" });
  conn.addTransceiver("audio", { direction: "recvonly" });
  conn.ontrack = (event) => {
    // Both tracks arrive in one MediaStream, so the browser keeps them in lip sync.
    const stream = event.streams[0] || new MediaStream([event.track]);
    if (video.srcObject !== stream) video.srcObject = stream;
    video.play().catch(() => {});
    if (event.track.kind === "audio" && video.muted) unmute.hidden = false;
  };
  conn.onconnectionstatechange = () => {
    if (conn !== pc) return;
    const s = conn.connectionState;
    if (s === "connected") setStatus("live");
    else if (s === "failed" || s === "closed") scheduleReconnect("connection " + s);
    else if (s === "disconnected") setStatus("connection interrupted…", true);
  };
  try {
    await conn.setLocalDescription(await conn.createOffer());
    await waitForIceGathering(conn, 2000);
    const resp = await fetch("offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: conn.localDescription.sdp, type: conn.localDescription.type, token }),
    });
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) {
      if (resp.status === 403) { setStatus("access denied: open the URL with ?token=… printed by pcavs-live", true); return; }
      throw new Error(body.error || ("HTTP " + resp.status));
    }
    await conn.setRemoteDescription(body);
  } catch (err) {
    scheduleReconnect("could not connect (" + err.message + ")");
  }
}

unmute.addEventListener("click", () => {
  video.muted = false;
  video.play().catch(() => {});
  unmute.hidden = true;
});

function renderStats(stats) {
  renderStatsInto(statsBody, stats);   // stats.js
}

async function pollStats() {
  try {
    const url = "stats" + (token ? "?token=" + encodeURIComponent(token) : "");
    const resp = await fetch(url, { cache: "no-store" });
    if (resp.ok) renderStats(await resp.json());
  } catch (err) {
    /* server restarting; keep the last numbers */
  } finally {
    setTimeout(pollStats, 1000);
  }
}

// Closing the connection when the tab goes away lets the server drop this viewer at once (otherwise
// it notices only when ICE consent expires, about 30 s later).
window.addEventListener("pagehide", () => { if (pc) pc.close(); });

connect();
pollStats();
