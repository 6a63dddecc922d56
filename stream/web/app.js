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

async function iceServers() {
  return fetchIceServers("ice" + (token ? "?token=" + encodeURIComponent(token) : ""));   // rtc.js
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
  showTracks(conn, video, unmute);   // rtc.js
  followConnection(conn, {
    current: () => conn === pc,
    connected: () => setStatus("live"),
    lost: scheduleReconnect,
    interrupted: () => setStatus("connection interrupted…", true),
  });
  try {
    const offer = await offerWithCandidates(conn);
    const resp = await fetch("offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: offer.sdp, type: offer.type, token }),
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

enableUnmute(video, unmute);

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
