// A job's page: its picture with the masks drawn from its result stream, its objects, figures, zones, alerts.
// window.vseg is a small hook for tests and the curious: what was painted last, the objects, the alerts.
import { getJSON, send, showError } from "./api.js";
import { ZoneEditor } from "./editor.js";
import { Overlay } from "./overlay.js";
import * as panels from "./panels.js";
import { FilePlayer, FramesPlayer, LivePlayer, NewestFramePlayer } from "./player.js";
import { Results } from "./store.js";

const $ = (id) => document.getElementById(id);
const jobId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const api = `/api/jobs/${encodeURIComponent(jobId)}`;
const marks = []; // points just clicked, shown until the reply
let info = null;
let results = null;
let overlay = null;
let player = null;
let editor = null;
let shown = null; // the picture shown: {idx} (a frame) or {time} (a live capture time)
let target = null; // the object picked for correction; null: a new object
let fig = {};
let due = false;

const vseg = {
  ready: false, painted: null, paints: 0,
  objects: () => [...results.objects.values()],
  alerts: () => results.alerts.slice(),
  result: (idx) => {
    const f = results.at(idx);
    return f && { frame_idx: f.frame_idx, captured_at: f.captured_at, skipped: f.skipped, obj_ids: [...f.objects.keys()] };
  },
  play: () => player && player.play(), pause: () => player && player.pause(), seek: (i) => player && player.seek(i),
  player: () => player && player.kind,
};
window.vseg = vseg;

function notice(text) { $("notice").textContent = text || ""; }

// The result frame for the picture shown: the frame itself, or for a live job the newest processed one then.
function currentFrame() {
  if (!shown || !results) return null;
  if (shown.time !== undefined) return results.atTime(shown.time);
  if (!shown.newest) return results.at(shown.idx);
  for (let i = shown.idx; i >= Math.max(0, shown.idx - 300); i -= 1) {
    const frame = results.at(i);
    if (frame && !frame.skipped) return frame;
  }
  return null;
}

function paint() {
  if (!overlay) return;
  const frame = currentFrame();
  const drawn = overlay.paint({ objects: frame ? frame.objects : null, zones: editor.zones, lines: editor.lines,
    draft: editor.draft, marks, showMasks: $("show-masks").checked });
  vseg.paints += 1;
  vseg.painted = { frame_idx: frame ? frame.frame_idx : null, obj_ids: drawn, shown, at: Date.now() };
  const label = shown && shown.idx !== undefined ? `frame ${shown.idx}` : frame ? `frame ${frame.frame_idx}` : "";
  $("frame-label").textContent = label + (frame || !shown ? "" : " (no result yet)");
  if (shown && shown.idx !== undefined && document.activeElement !== $("seek")) $("seek").value = shown.idx;
}

// A panel is redrawn only when what it shows changed: a button under the pointer stays the same element.
const drawn = {};
function redraw(name, signature, draw) {
  const text = JSON.stringify(signature);
  if (drawn[name] === text) return;
  drawn[name] = text;
  draw();
}

// Panels and picture at most once an animation frame, however many entries came.
function refresh() {
  if (due) return;
  due = true;
  requestAnimationFrame(() => {
    due = false;
    redraw("objects", [[...results.objects.values()], target, info.writable],
      () => panels.objects($("objects"), results.objects, target, info.writable, { pick, remove }));
    redraw("figures", [fig, info.media, results.terminal], () => panels.figures($("figures"), fig, info, results.terminal));
    redraw("alerts", [results.alerts.length, results.alerts[0] && results.alerts[0].key],
      () => panels.alerts($("alerts"), results.alerts, (a) => !info.live && player && player.seek(a.frame_idx)));
    redraw("zones", [editor.zones, editor.lines], () => panels.zones($("zones"), editor, { remove: (name) => editor.remove(name) }));
    if (player && player.lastFrame !== undefined) $("seek").max = Math.max(player.lastFrame, results.lastFrame, 0);
    paint();
  });
}

function pick(objId) { target = objId; refresh(); }

async function remove(objId) {
  try {
    notice((await send("POST", `${api}/remove`, { obj_id: objId })).message);
  } catch (e) { showError(e.message); }
}

async function prompt(x, y, positive) {
  if (!info.writable) { showError(`job ${jobId} has ended: it takes no more prompts`); return; }
  if (!info.live && player && player.playing) player.pause();
  const frame = info.live || !shown || shown.idx === undefined ? null : shown.idx;
  if (frame !== null && frame < 0) { showError("this picture is before the job's first frame (its --start)"); return; }
  const mark = { x, y, positive };
  marks.push(mark);
  paint();
  try {
    const reply = await send("POST", `${api}/prompt`, { x, y, obj_id: target, frame, positive });
    showError("");
    notice(reply.message);
    if (!results.objects.has(reply.obj_id)) results.touch(reply.obj_id, { state: "requested", from: frame });
  } catch (e) {
    showError(e.message);
  } finally {
    setTimeout(() => { marks.splice(marks.indexOf(mark), 1); refresh(); }, 1500);
    refresh();
  }
}

function toFrame(event) {
  const box = $("overlay").getBoundingClientRect();
  return [(event.clientX - box.left) * info.width / box.width, (event.clientY - box.top) * info.height / box.height];
}

function onEntry(doc) {
  if (doc.type === "figures") {
    const ended = ["completed", "failed", "cancelled", "dead"].includes(doc.state);
    if (doc.state !== fig.state) $("state").textContent = doc.state;
    if (ended && info.writable) reload();
    fig = doc;
  } else if (doc.type === "zones") {
    if (!editor.dirty) editor.load(doc.zones);
  } else if (doc.type === "error") {
    notice(doc.error);
  } else if (doc.type === "gone") {
    showError(doc.error);
  } else {
    results.apply(doc);
  }
  refresh();
}

async function reload() {
  const fresh = await getJSON(api).catch(() => null);
  if (fresh) info = { ...fresh, media: { ...fresh.media } };
  refresh();
}

function connect() {
  const stream = new EventSource(`${api}/stream${info.live ? "?tail=1500" : ""}`);
  stream.onmessage = (e) => onEntry(JSON.parse(e.data));
  stream.onerror = () => notice("lost the connection to the viewer; reconnecting…");
  stream.onopen = () => notice("");
}

function choosePlayer() {
  const video = $("video");
  const still = $("still");
  const show = (key) => { shown = key; paint(); };
  const frames = () => {
    video.hidden = true;
    still.hidden = false;
    notice("showing the job's frames (its video cannot be played here)");
    return new FramesPlayer(still, (i) => info.media.frames.replace("{idx}", i), info.fps || 10,
      () => results.lastFrame, show, (i) => notice(`frame ${i} is gone from disk`));
  };
  if (info.live && info.media.preview) {
    return new LivePlayer(video, info.media.preview, show, notice);
  }
  if (info.live) {
    video.hidden = true;
    still.hidden = false;
    return new NewestFramePlayer(still, info.media.latest_frame, show,
      () => notice("no picture: this live job has no preview (VSEG_LIVE_PREVIEW_HEIGHT=0) and no frame on disk now"));
  }
  const sources = [{ kind: "source", url: info.media.source, offset: info.start_s || 0 },
    { kind: "render", url: info.media.render, offset: 0 }];
  if ((info.media.source || info.media.render) && info.fps) {
    return new FilePlayer(video, sources, info.fps, show, () => {
      if (!info.media.frames) { notice("nothing to show: the video cannot be played and its frames are gone"); return; }
      player = frames();
      player.start();
    });
  }
  if (info.media.frames) return frames();
  notice("nothing to show: no source video, render or frames are left for this job");
  return null;
}

function wire() {
  const canvas = $("overlay");
  canvas.addEventListener("click", (e) => {
    const [x, y] = toFrame(e);
    if (editor.mode === "point") { prompt(x, y, !e.shiftKey); return; }
    notice(editor.click(x, y, $("shape-name").value));
  });
  canvas.addEventListener("dblclick", () => { if (editor.mode === "zone") notice(editor.finish($("shape-name").value)); });
  for (const button of document.querySelectorAll("[data-mode]")) {
    button.addEventListener("click", () => {
      editor.setMode(button.dataset.mode);
      document.querySelectorAll("[data-mode]").forEach((b) => b.classList.toggle("active", b === button));
      notice({ point: "click an object: a new one, or the one picked in the list (shift-click: not this)",
        zone: "click the zone's corners, then finish (or double-click)", line: "click the line's two ends" }[editor.mode]);
    });
  }
  $("finish-shape").addEventListener("click", () => notice(editor.finish($("shape-name").value)));
  $("cancel-shape").addEventListener("click", () => editor.cancel());
  $("save-zones").addEventListener("click", async () => {
    try {
      const reply = await send("PUT", `${api}/zones`, editor.body());
      editor.dirty = false;
      showError("");
      notice(reply.message);
    } catch (e) { showError(e.message); }
  });
  $("play").addEventListener("click", () => (player && player.playing ? player.pause() : player && player.play()));
  $("prev").addEventListener("click", () => player && player.step(-1));
  $("next").addEventListener("click", () => player && player.step(1));
  $("seek").addEventListener("input", (e) => player && player.seek(Number(e.target.value)));
  $("show-masks").addEventListener("change", paint);
  const video = $("video");
  for (const name of ["play", "pause"]) video.addEventListener(name, () => { $("play").textContent = video.paused ? "Play" : "Pause"; });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT") return;
    if (e.key === " ") { e.preventDefault(); $("play").click(); }
    if (e.key === "ArrowLeft") player && player.step(-1);
    if (e.key === "ArrowRight") player && player.step(1);
    if (e.key === "Escape") editor.cancel();
    if (e.key === "Enter") notice(editor.finish($("shape-name").value));
  });
}

async function main() {
  $("job-id").textContent = jobId;
  try {
    info = await getJSON(api);
  } catch (e) {
    showError(e.message);
    return;
  }
  document.title = `vseg · ${jobId}`;
  $("state").textContent = info.state;
  $("kind").textContent = info.live ? `live${info.camera ? ` · camera ${info.camera}` : ""}` : `file · ${info.source}`;
  if (!info.width || !info.height) {
    showError("this job's frame size is not known yet (no frame published); reload in a moment");
    return;
  }
  $("stage").style.aspectRatio = `${info.width} / ${info.height}`;
  $("stage").style.maxWidth = `calc(75vh * ${info.width} / ${info.height})`;
  overlay = new Overlay($("overlay"), info.width, info.height);
  results = new Results(info.live);
  fig = info.figures;
  editor = new ZoneEditor(refresh);
  editor.load(info.zones);
  wire();
  player = choosePlayer();
  if (player) player.start();
  for (const id of ["prev", "next", "seek"]) $(id).hidden = info.live;
  connect();
  vseg.ready = true;
  refresh();
}

main();
