// pcavs-live studio: this browser's microphone (and camera) go to the server on one RTCPeerConnection,
// and its own avatar (video + the voice, delayed to match) comes back on the same connection.
// With ?s=ID&v=KEY the page is a share link instead: a view-only player of that session.
// No external scripts: the page must work on an offline machine.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const viewId = params.get("s");
const viewKey = params.get("v");
const $ = (id) => document.getElementById(id);
const video = $("video");
const state = { pc: null, session: null, local: null, statsTimer: null, running: false };
window.studio = state;   // for tests and the curious: the live connection and session

function setStatus(text, bad) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", !!bad);
}

function showError(text) {
  $("error").textContent = text || "";
  $("error").hidden = !text;
  if (text) setStatus("error", true);
}

async function iceServers(query) {
  return fetchIceServers("ice?" + query);   // rtc.js
}

async function postJson(url, body) {
  const resp = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify(body) });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(data.error || ("HTTP " + resp.status));
  return data;
}

function attach(conn) {
  showTracks(conn, video, viewId ? $("unmute") : null);   // rtc.js; the studio's own voice stays muted
}

// Energy of the returned audio, measured with WebAudio on the received track (tests read it).
let analyser = null;
window.returnAudioLevel = () => {
  const stream = video.srcObject;
  if (!stream || !stream.getAudioTracks().length) return 0;
  if (!analyser) {
    const ctx = new AudioContext();
    analyser = ctx.createAnalyser();
    analyser.fftSize = 2048;
    ctx.createMediaStreamSource(stream).connect(analyser);
    ctx.resume();
  }
  const buf = new Float32Array(analyser.fftSize);
  analyser.getFloatTimeDomainData(buf);
  let sum = 0;
  for (const x of buf) sum += x * x;
  return Math.sqrt(sum / buf.length);
};

function renderStats(stats) {
  for (const td of document.querySelectorAll("#stats td[data-key]")) {
    const v = stats[td.dataset.key];
    td.textContent = (v === null || v === undefined) ? "–" :
      (typeof v === "number" && !Number.isInteger(v)) ? v.toFixed(1) : String(v);
  }
}

function pollStats(query) {
  clearTimeout(state.statsTimer);
  const tick = async () => {
    try {
      const resp = await fetch(`sessions/${state.session.id}/stats?${query}`, { cache: "no-store" });
      if (resp.ok) renderStats(await resp.json());
      else if (resp.status === 404) { ended("the session has ended"); return; }
      else if (resp.status === 410) {   // its render worker died (cluster): say why, start anew on a live one
        const why = ((await resp.json().catch(() => ({}))).error) || "the session's worker stopped";
        ended(why);
        if (query.startsWith("secret=")) { start(); setStatus(why + " — starting a new session…", false); }
        return;
      }
    } catch (err) { /* keep the last numbers */ }
    state.statsTimer = setTimeout(tick, 1000);
  };
  tick();
}

function ended(why) {
  clearTimeout(state.statsTimer);
  if (state.pc) { try { state.pc.close(); } catch (e) { /* closed */ } }
  state.pc = null;
  if (state.local) for (const t of state.local.getTracks()) t.stop();
  state.local = null;
  state.running = false;
  $("start").disabled = false;
  $("stop").disabled = true;
  setStatus(why || "stopped", false);
}

async function start() {
  showError("");
  $("start").disabled = true;
  setStatus("starting…");
  try {
    const upload = document.querySelector("input[name=photo]:checked").value === "upload";
    const file = $("file").files[0];
    if (upload && !file) throw new Error("choose a photo file first (or use the sample)");
    const useCamera = $("camera").checked;
    state.local = await navigator.mediaDevices.getUserMedia({ audio: true, video: useCamera });
    const q = new URLSearchParams();
    if (token) q.set("token", token);
    if (!upload) q.set("sample", "1");
    if ($("room").checked) q.set("share", "1");
    const resp = await fetch("sessions?" + q, { method: "POST", body: upload ? file : null,
                                                headers: upload ? { "Content-Type": file.type || "application/octet-stream" } : {} });
    const session = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(session.error || ("HTTP " + resp.status));
    state.session = session;
    const conn = new RTCPeerConnection({ iceServers: await iceServers(`s=${session.id}&secret=${encodeURIComponent(session.secret)}`) });
    state.pc = conn;
    attach(conn);
    for (const track of state.local.getTracks()) conn.addTrack(track, state.local);
    if (!useCamera) conn.addTransceiver("video", { direction: "recvonly" });
    followConnection(conn, {
      current: () => conn === state.pc,
      connected: () => setStatus("live"),
      lost: ended,
      interrupted: () => setStatus("connection interrupted…", true),
    });
    const offer = await offerWithCandidates(conn);
    const answer = await postJson(`sessions/${session.id}/offer`,
      { sdp: offer.sdp, type: offer.type, secret: session.secret });
    await conn.setRemoteDescription(answer);
    state.running = true;
    $("stop").disabled = false;
    const link = new URL(session.share, location.href).href;
    $("share-link").href = link;
    $("share-link").textContent = link;
    $("share").hidden = false;
    const roomUrl = session.room && session.room.viewer_url;
    if (roomUrl) { $("room-link").href = roomUrl; $("room-link").textContent = roomUrl; }
    $("room-line").hidden = !roomUrl;
    pollStats("secret=" + encodeURIComponent(session.secret));
  } catch (err) {
    const session = state.session;
    ended("stopped");
    if (session && session.secret) stopSession(session, false);
    showError(err.message || String(err));
  }
}

function stopSession(session, beacon) {
  const body = JSON.stringify({ secret: session.secret });
  const url = `sessions/${session.id}/stop`;
  if (beacon && navigator.sendBeacon) return navigator.sendBeacon(url, body);
  return fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body }).catch(() => {});
}

async function stop() {
  const session = state.session;
  ended("stopped");
  if (session) await stopSession(session, false);
  state.session = null;
}

async function view() {
  // Share link: receive-only, this session's avatar and its voice.
  $("controls").hidden = true;
  state.session = { id: viewId };
  setStatus("connecting…");
  try {
    const conn = new RTCPeerConnection({ iceServers: await iceServers(`s=${viewId}&v=${encodeURIComponent(viewKey)}`) });
    state.pc = conn;
    attach(conn);
    conn.addTransceiver("video", { direction: "recvonly" });
    conn.addTransceiver("audio", { direction: "recvonly" });
    followConnection(conn, {
      connected: () => setStatus("watching"),
      lost: () => setStatus("the session has ended", true),
    });
    const offer = await offerWithCandidates(conn);
    const answer = await postJson(`sessions/${viewId}/view`,
      { sdp: offer.sdp, type: offer.type, view: viewKey });
    await conn.setRemoteDescription(answer);
    pollStats("view=" + encodeURIComponent(viewKey));
  } catch (err) {
    showError(err.message || String(err));
  }
}

enableUnmute(video, $("unmute"));
$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
$("file").addEventListener("change", () => { document.querySelector("input[value=upload]").checked = true; });
// A closed tab ends the session at once (the server would also notice the connection going away).
window.addEventListener("pagehide", () => {
  if (!viewId && state.session && state.running) stopSession(state.session, true);
  if (state.pc) state.pc.close();
});

// "share to room": enabled only when the server has a [whip] endpoint; otherwise the reason is shown.
async function loadRoom() {
  try {
    const resp = await fetch("room", { cache: "no-store" });
    const room = resp.ok ? await resp.json() : { enabled: false, reason: "this server cannot share to a room" };
    $("room").disabled = !room.enabled;
    $("room-why").textContent = room.enabled ? "" : "(" + room.reason + ")";
  } catch (err) { $("room-why").textContent = "(the server did not say whether it can share)"; }
}

// The same checkbox during a running session takes it on or off the air (POST sessions/ID/share); the
// room's viewer URL line is shown while it is on. A refusal (another presenter: 409) unticks it again.
function showRoomLine(url) {
  if (url) { $("room-link").href = url; $("room-link").textContent = url; }
  $("room-line").hidden = !url;
}

async function toggleShare() {
  const session = state.session;
  if (!session || !session.secret || !state.running) return;   // before Start: only remembered for Start
  const box = $("room");
  const on = box.checked;
  box.disabled = true;
  showError("");
  try {
    const reply = await postJson(`sessions/${session.id}/share`, { secret: session.secret, on });
    box.checked = reply.share;
    showRoomLine(reply.share && reply.room ? reply.room.viewer_url : null);
  } catch (err) {
    box.checked = !on;
    showError(err.message || String(err));
  } finally {
    box.disabled = false;
  }
}
$("room").addEventListener("change", toggleShare);

if (viewId && viewKey) view();
else loadRoom();
