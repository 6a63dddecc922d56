// pcavs-live room viewer: watches the avatar that a session publishes by WHIP (`--out whip`) into a
// Janus VideoRoom, as a subscriber through Janus's plain HTTP API (fetch + SDP, no janus.js), so any
// number of viewers cost the session nothing. No external scripts: the page must work offline.
//
// Query: ?janus=http://HOST:8088/janus (Janus's HTTP API; default: port 8088 on this page's host)
//        &room=1234 (the VideoRoom the WHIP endpoint publishes into)
//        &token=… (the session's viewer token, for its /stats when the page is served by pcavs-live)
//        &whep=URL (instead of Janus: play this WHEP endpoint, whep.js; &token= is its bearer token)
//        &stats=URL (optional: the session's /stats, e.g. http://HOST:8080/stats?token=…; when the page
//                    is served by pcavs-live itself, its own /stats is used)
"use strict";

const params = new URLSearchParams(location.search);
const janusUrl = (params.get("janus") || `${location.protocol}//${location.hostname}:8088/janus`).replace(/\/$/, "");
const room = Number(params.get("room") || 1234);
const token = params.get("token");
const statsUrl = params.get("stats") ||
  (location.pathname.startsWith("/static/") ? "../stats" + (token ? "?token=" + encodeURIComponent(token) : "") : null);
const video = document.getElementById("video");
const unmute = document.getElementById("unmute");
const statusEl = document.getElementById("status");
const statsBody = document.querySelector("#stats tbody");
let pc = null;
let session = null;
let retryTimer = null;
let serverStats = {};
let lastInbound = null;

function setStatus(text, bad) {
  statusEl.textContent = text;
  statusEl.classList.toggle("bad", !!bad);
}

function tx() { return Math.random().toString(36).slice(2, 14); }

async function janus(path, body) {
  const resp = await fetch(janusUrl + path, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(Object.assign({ transaction: tx() }, body)),
  });
  const reply = await resp.json();
  if (reply.janus === "error") throw new Error(reply.error ? reply.error.reason : "Janus error");
  const data = reply.plugindata && reply.plugindata.data;
  if (data && data.error) throw new Error(data.error);
  return reply;
}

async function nextEvent(sessionId, handleId, ms) {
  // Janus answers a long poll with the next event of the session (or a keepalive after 30 s).
  const until = Date.now() + ms;
  while (Date.now() < until) {
    const resp = await fetch(`${janusUrl}/${sessionId}?maxev=1&rid=${Date.now()}`, { cache: "no-store" });
    const event = await resp.json();
    if (event.janus === "event" && event.sender === handleId) return event;
    if (event.janus === "hangup" || event.janus === "detached") throw new Error("Janus hung up");
  }
  throw new Error("Janus sent no offer");
}

function scheduleReconnect(why) {
  setStatus(why + " — retrying in 3 s", true);
  if (retryTimer === null) retryTimer = setTimeout(() => { retryTimer = null; connect(); }, 3000);
}

async function keepPolling(sessionId) {
  // The long poll is also the session's keepalive; it stops when this session is replaced.
  while (session === sessionId) {
    try {
      const resp = await fetch(`${janusUrl}/${sessionId}?maxev=5&rid=${Date.now()}`, { cache: "no-store" });
      const events = [].concat(await resp.json());
      for (const e of events) {
        const data = e.plugindata && e.plugindata.data;
        if (e.janus === "hangup" || (data && (data.unpublished || data.leaving))) {
          if (session === sessionId) scheduleReconnect("the publisher left");
          return;
        }
        if (e.janus === "error") { if (session === sessionId) scheduleReconnect("Janus session lost"); return; }
      }
    } catch (err) {
      if (session === sessionId) scheduleReconnect("Janus unreachable");
      return;
    }
  }
}

async function connect() {
  if (whepUrl) return connectWhep();
  if (pc) { try { pc.close(); } catch (e) { /* already closed */ } }
  session = null;
  setStatus("connecting…");
  try {
    const sessionId = (await janus("", { janus: "create" })).data.id;
    const handleId = (await janus(`/${sessionId}`, { janus: "attach", plugin: "janus.plugin.videoroom" })).data.id;
    const handle = `/${sessionId}/${handleId}`;
    const list = await janus(handle, { janus: "message", body: { request: "listparticipants", room } });
    const publisher = (list.plugindata.data.participants || []).find((p) => p.publisher);
    if (!publisher) { scheduleReconnect("nobody is publishing in room " + room); return; }
    await janus(handle, { janus: "message", body: { request: "join", ptype: "subscriber", room,
                                                   streams: [{ feed: publisher.id }] } });
    const offer = (await nextEvent(sessionId, handleId, 10000)).jsep;
    const conn = new RTCPeerConnection();
    pc = conn;
    showTracks(conn, video, unmute);   // rtc.js; Janus puts both tracks in one MediaStream
    followConnection(conn, {
      current: () => conn === pc,
      connected: () => setStatus("live (room " + room + ")"),
      lost: scheduleReconnect,
      interrupted: () => setStatus("connection interrupted…", true),
    });
    const answer = await answerWithCandidates(conn, offer);
    await janus(handle, { janus: "message", body: { request: "start", room },
                          jsep: { type: "answer", sdp: answer.sdp } });
    await janus(handle, { janus: "trickle", candidate: { completed: true } });
    session = sessionId;
    keepPolling(sessionId);
  } catch (err) {
    scheduleReconnect("could not join (" + err.message + ")");
  }
}

enableUnmute(video, unmute);

function renderStats(stats) {
  // The session's own stats (the direct viewer's rows) plus what this viewer receives through the SFU.
  renderStatsInto(statsBody, stats);   // stats.js
}

async function receivedStats() {
  if (!pc) return {};
  const out = {};
  (await pc.getStats()).forEach((s) => {
    if (s.type !== "inbound-rtp" || s.kind !== "video") return;
    if (lastInbound) {
      const dt = (s.timestamp - lastInbound.timestamp) / 1000;
      if (dt > 0) out.viewer_fps = (s.framesDecoded - lastInbound.framesDecoded) / dt;
    }
    out.viewer_frames_decoded = s.framesDecoded;
    out.viewer_frames_dropped = s.framesDropped;
    out.viewer_packets_lost = s.packetsLost;
    lastInbound = s;
  });
  return out;
}

async function pollStats() {
  try {
    if (statsUrl) {
      const resp = await fetch(statsUrl, { cache: "no-store" });
      if (resp.ok) serverStats = await resp.json();
    }
  } catch (err) {
    /* the session's server is not reachable from here: show this viewer's numbers only */
  }
  try {
    renderStats(Object.assign({}, serverStats, await receivedStats()));
  } finally {
    setTimeout(pollStats, 1000);
  }
}

// WHEP mode (?whep=URL): the same page and stats row, the stream from any WHEP endpoint (whep.js).
const whepUrl = params.get("whep");
let whepSession = null;

async function connectWhep() {
  whepStop(whepSession);
  whepSession = null;
  setStatus("connecting…");
  try {
    const s = await whepStart(new URL(whepUrl, location.href).href, token, (event) => {
      const stream = event.streams[0] || new MediaStream([event.track]);
      if (video.srcObject !== stream) video.srcObject = stream;
      video.play().catch(() => {});
      if (event.track.kind === "audio" && video.muted) unmute.hidden = false;
    });
    whepSession = s;
    pc = s.pc;
    s.pc.onconnectionstatechange = () => {
      if (s !== whepSession) return;
      const state = s.pc.connectionState;
      if (state === "connected") setStatus("live (WHEP)");
      else if (state === "failed" || state === "closed") scheduleReconnect("connection " + state);
      else if (state === "disconnected") setStatus("connection interrupted…", true);
    };
  } catch (err) {
    scheduleReconnect("could not watch (" + err.message + ")");
  }
}

window.addEventListener("pagehide", () => {
  whepStop(whepSession);
  // Leave the room at once instead of when Janus's session times out.
  if (session) fetch(`${janusUrl}/${session}`, {
    method: "POST", keepalive: true, body: JSON.stringify({ janus: "destroy", transaction: tx() }) });
  if (pc) pc.close();
});

connect();
pollStats();
