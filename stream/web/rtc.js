// pcavs-live pages' one copy of the WebRTC connection code (the viewer app.js, the studio studio.js and
// the SFU room room.js load it before their own script): the STUN/TURN list from the server, an offer or
// answer sent with its candidates included (aiortc and our Janus calls use no trickle ICE), the received
// tracks shown in one <video>, and the connection's state changes routed to the page.
// No external scripts: the pages must work on an offline machine.
"use strict";

const ICE_GATHERING_MS = 2000;   // a candidate that takes longer is left out rather than stall the page

function waitForIceGathering(conn, ms) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { conn.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (conn.iceGatheringState === "complete") done(); };
    conn.addEventListener("icegatheringstatechange", check);
    setTimeout(done, ms);
  });
}

async function fetchIceServers(url) {
  // The STUN/TURN servers configured on the server (server.stun_url, server.turn_*), so that a browser
  // behind NAT gathers the same kinds of candidates; none when the request fails (host candidates only).
  try {
    const resp = await fetch(url, { cache: "no-store" });
    if (resp.ok) return (await resp.json()).iceServers || [];
  } catch (err) { /* server restarting: host candidates only */ }
  return [];
}

async function offerWithCandidates(conn) {
  // Our offer, complete with its candidates: { sdp, type } to send.
  await conn.setLocalDescription(await conn.createOffer());
  await waitForIceGathering(conn, ICE_GATHERING_MS);
  return { sdp: conn.localDescription.sdp, type: conn.localDescription.type };
}

async function answerWithCandidates(conn, offer) {
  // The remote side's offer applied and our answer, complete with its candidates: { sdp, type } to send.
  await conn.setRemoteDescription(offer);
  await conn.setLocalDescription(await conn.createAnswer());
  await waitForIceGathering(conn, ICE_GATHERING_MS);
  return { sdp: conn.localDescription.sdp, type: conn.localDescription.type };
}

function showTracks(conn, video, unmute) {
  // Both tracks arrive in one MediaStream, so the browser keeps them in lip sync. `unmute` (a button,
  // or null): shown once audio arrives while the element is muted (autoplay rules).
  conn.ontrack = (event) => {
    const stream = event.streams[0] || new MediaStream([event.track]);
    if (video.srcObject !== stream) video.srcObject = stream;
    video.play().catch(() => {});
    if (unmute && event.track.kind === "audio" && video.muted) unmute.hidden = false;
  };
}

function enableUnmute(video, unmute) {
  unmute.addEventListener("click", () => {
    video.muted = false;
    video.play().catch(() => {});
    unmute.hidden = true;
  });
}

function followConnection(conn, on) {
  // The connection's state, to the page: on.connected(), on.lost("connection failed"/"connection
  // closed"), on.interrupted() (optional); ignored while on.current() (optional) says this connection
  // has been replaced by a newer one.
  conn.onconnectionstatechange = () => {
    if (on.current && !on.current()) return;
    const s = conn.connectionState;
    if (s === "connected") on.connected();
    else if (s === "failed" || s === "closed") on.lost("connection " + s);
    else if (s === "disconnected" && on.interrupted) on.interrupted();
  };
}
