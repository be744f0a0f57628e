// The page of cameras and jobs, redrawn from each snapshot of /api/overview/stream (sent when it changes).
import { clock, el, fmt, showError } from "./api.js";

const job = (id) => (id ? el("a", { href: `/jobs/${encodeURIComponent(id)}` }, id) : "–");

function cameraRow(c) {
  return el("tr", { "data-camera": c.camera },
    el("td", {}, c.camera), el("td", { class: `state-${c.state}` }, c.state_text + (c.reason ? ` (${c.reason})` : "")),
    el("td", {}, job(c.job)), el("td", { class: "num" }, fmt(c.fps ? Number(c.fps) : null, 1)),
    el("td", { class: "num" }, fmt(c.latency_p50_s ? Number(c.latency_p50_s) : null, 2, " s")),
    el("td", { class: "num" }, fmt(c.latency_p95_s ? Number(c.latency_p95_s) : null, 2, " s")),
    el("td", { class: "num" }, c.outages || "–"), el("td", { class: "num" }, c.restarts || "–"),
    el("td", {}, c.daemon || "–"));
}

function jobRow(j) {
  const progress = j.live ? `${fmt(j.frames_done)} frames, ${fmt(j.dropped)} skipped`
    : `${fmt(j.frames_done)} / ${fmt(j.num_frames)}`;
  return el("tr", { "data-job": j.job_id },
    el("td", {}, job(j.job_id)), el("td", { class: `state-${j.state}` }, j.state),
    el("td", {}, j.live ? `live${j.camera ? ` · ${j.camera}` : ""}` : "file"), el("td", { class: "num" }, progress),
    el("td", { class: "num" }, j.live ? fmt(j.latency_p50_s, 2, " s") : "–"), el("td", {}, j.source || "–"),
    el("td", {}, clock(j.submitted_at)), el("td", {}, j.error || ""));
}

function show(doc) {
  const cams = document.querySelector("#cameras tbody");
  cams.replaceChildren(...doc.cameras.map(cameraRow));
  if (!doc.cameras.length) cams.replaceChildren(el("tr", {}, el("td", { colspan: 9, class: "muted" }, "no cameras: no `python -m producer serve` daemon publishes any to this Redis")));
  const jobs = document.querySelector("#jobs tbody");
  jobs.replaceChildren(...doc.jobs.map(jobRow));
  if (!doc.jobs.length) jobs.replaceChildren(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "no recent jobs")));
  document.getElementById("updated").textContent = `as of ${clock(doc.at)}`;
}

const stream = new EventSource("/api/overview/stream");
stream.onmessage = (e) => {
  const doc = JSON.parse(e.data);
  if (doc.type === "overview") { showError(""); show(doc); }
  if (doc.type === "error") showError(doc.error);
};
stream.onerror = () => showError("lost the connection to the viewer; reconnecting…");
