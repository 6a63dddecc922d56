// The stats table every page shows (viewer, SFU room): one row per key the server reports, and one row per
// viewer of `viewer_streams` (what it was sent and what its own queue lost). Shared by app.js and room.js.
"use strict";

function formatValue(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(1);
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function statsRow(key, label, text) {
  const tr = document.createElement("tr");
  const k = document.createElement("td");
  const v = document.createElement("td");
  k.textContent = label;
  v.textContent = text;
  v.dataset.key = key;
  tr.append(k, v);
  return tr;
}

function viewerText(s) {
  // What one viewer got and what its own queue lost (when the server could not keep up).
  return `video ${s.video_sent} sent, ${s.video_dropped} dropped · audio ${s.audio_sent} sent, ${s.audio_dropped} dropped`;
}

function renderStatsInto(tbody, stats) {
  // Generic on purpose: whatever keys the server reports become rows; each viewer gets its own row.
  const viewers = Array.isArray(stats.viewer_streams) ? stats.viewer_streams : [];
  const rows = Object.keys(stats).filter((key) => key !== "viewer_streams").sort()
    .map((key) => statsRow(key, key.replace(/_/g, " "), formatValue(stats[key])));
  for (const s of viewers) rows.push(statsRow(`viewer_${s.viewer}`, `viewer ${s.viewer}`, viewerText(s)));
  tbody.replaceChildren(...rows);
}
