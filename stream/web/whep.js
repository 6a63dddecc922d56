// WHEP player (draft-ietf-wish-whep) with plain fetch + RTCPeerConnection: no Janus, no external
// scripts (rtc.js, loaded first, gathers the candidates). POST a recvonly offer (Content-Type
// application/sdp, optional bearer token), take the 201's SDP answer and Location, DELETE the Location to
// leave. Plays any WHEP endpoint: ours (/whep on the viewer server, /sessions/ID/whep on the studio),
// Cloudflare Stream's, MediaMTX's. Used by room.js (?whep=URL).
"use strict";

function whepReason(status, text) {
  // Our servers refuse with {"error": one line}; others with plain text.
  let reason = text;
  try { reason = JSON.parse(text).error || text; } catch (e) { /* plain text */ }
  return `HTTP ${status}` + (reason ? ": " + reason.replace(/\s+/g, " ").slice(0, 160) : "");
}

// Resolves to {pc, resource, token} once the answer is applied; throws an Error with one line.
async function whepStart(url, token, onTrack, iceServers) {
  const conn = new RTCPeerConnection({ iceServers: iceServers || [] });
  conn.addTransceiver("video", { direction: "recvonly" });
  conn.addTransceiver("audio", { direction: "recvonly" });
  conn.ontrack = onTrack;
  try {
    await conn.setLocalDescription(await conn.createOffer());
    await waitForIceGathering(conn, 2000);  // rtc.js
    const headers = { "Content-Type": "application/sdp" };
    if (token) headers.Authorization = "Bearer " + token;
    let resp;
    try {
      resp = await fetch(url, { method: "POST", headers, body: conn.localDescription.sdp, cache: "no-store" });
    } catch (err) {
      throw new Error("cannot reach " + url);
    }
    const text = await resp.text();
    if (resp.status !== 201) throw new Error(whepReason(resp.status, text));
    const where = resp.headers.get("Location");
    await conn.setRemoteDescription({ type: "answer", sdp: text });
    return { pc: conn, resource: where ? new URL(where, url).href : null, token };
  } catch (err) {
    conn.close();
    throw err;
  }
}

// Leaves: DELETE the resource (keepalive, so it also goes out while the page unloads) and close.
function whepStop(session) {
  if (!session) return;
  if (session.resource) {
    fetch(session.resource, { method: "DELETE", keepalive: true,
                              headers: session.token ? { Authorization: "Bearer " + session.token } : {} })
      .catch(() => { /* the server has already forgotten it */ });
  }
  try { session.pc.close(); } catch (e) { /* already closed */ }
}
