// The job page's side panels, redrawn from the page's state: the objects (with their lifecycle, a button to
// pick one for correction and one to remove it), the figures, the zones and lines, the alerts (newest first).
import { clock, el, fmt } from "./api.js";
import { cssColour } from "./overlay.js";

const STATES = {
  prompted: "prompted at submit", tracked: "tracked", requested: "requested…", added: "added",
  corrected: "corrected", removed: "removed", lost: "lost", refused: "refused",
};

function lifecycle(o) {
  const word = STATES[o.state] || o.state;
  const from = o.from !== null && o.from !== undefined && o.state !== "tracked" ? ` from frame ${o.from}` : "";
  const note = o.note ? ` (${o.note})` : "";
  return `${word}${o.source === "auto" ? " by --auto" : ""}${from}${note}`;
}

export function objects(list, known, target, writable, { pick, remove }) {
  const rows = [...known.values()].sort((a, b) => a.obj_id - b.obj_id);
  list.replaceChildren(
    el("li", { class: target === null ? "picked" : "" },
      el("label", {}, el("input", { type: "radio", name: "target", value: "new", checked: target === null,
        onchange: () => pick(null) }), " new object (click the picture)")),
    ...rows.map((o) => {
      const gone = ["removed", "lost", "refused"].includes(o.state);
      return el("li", { class: `object ${target === o.obj_id ? "picked" : ""} ${gone ? "gone" : ""}`,
        "data-obj": o.obj_id },
      el("label", {}, el("input", { type: "radio", name: "target", value: o.obj_id, checked: target === o.obj_id,
        disabled: gone || !writable, onchange: () => pick(o.obj_id) }),
      el("span", { class: "swatch", style: `background:${cssColour(o.obj_id)}` }),
      el("b", {}, `#${o.obj_id}`), o.label ? ` ${o.label}` : ""),
      el("span", { class: "state" }, lifecycle(o)),
      el("button", { class: "remove", title: `stop tracking object ${o.obj_id}`, disabled: gone || !writable,
        onclick: () => remove(o.obj_id) }, "remove"));
    }));
}

function row(term, value) {
  return [el("dt", {}, term), el("dd", {}, value)];
}

export function figures(dl, f, info, terminal) {
  const rows = [
    row("state", f.state + (f.attempt > 1 ? ` (attempt ${f.attempt})` : "")),
    row("worker", f.worker || "–"),
  ];
  if (f.live) {
    rows.push(row("frames", `${fmt(f.frames_done)} published, ${fmt(f.dropped)} skipped to keep up`),
      row("processed", fmt(f.fps, 1, " fps")),
      row("latency", `p50 ${fmt(f.latency_p50_s, 2, " s")} · p95 ${fmt(f.latency_p95_s, 2, " s")}`),
      row("dropped at ingest", fmt(f.dropped_at_ingest)),
      row("source", f.source_state === "down" ? `down since ${clock(f.source_down_since)}` : (f.source_state || "–")),
      row("outages", f.source_outages ? `${f.source_outages} (${fmt(f.source_down_s, 1, " s")} down in all)` : "none"));
  } else {
    const took = terminal && terminal.timings_s ? terminal.timings_s.total_s : null;
    const average = f.fps === null && took ? `${fmt(terminal.num_frames / took, 1, " fps")} on average` : null;
    rows.push(row("frames", `${fmt(f.frames_done)} of ${fmt(f.num_frames)}`),
      row("processed", average || fmt(f.fps, 1, " fps")));
  }
  if (f.auto_keyframes) rows.push(row("auto", `${f.auto_keyframes} keyframes, ${f.auto_added} of ${f.auto_proposed} added`));
  if (terminal && terminal.timings_s && terminal.timings_s.total_s !== undefined) {
    rows.push(row("took", `${fmt(terminal.timings_s.total_s, 1, " s")} (first result ${fmt(terminal.timings_s.first_result_s, 2, " s")})`));
  }
  if (f.error) rows.push(row("error", f.error));
  if (info && info.media && info.media.render) rows.push(row("render", el("a", { href: info.media.render }, "MP4")));
  dl.replaceChildren(...rows.flat());
}

export function zones(list, editor, { remove }) {
  const items = [...editor.zones.map((z) => ["zone", z]), ...editor.lines.map((l) => ["line", l])];
  list.replaceChildren(...items.map(([kind, s]) => el("li", { "data-name": s.name },
    `${kind} `, el("b", {}, s.name), ` (${s.points.length} points) `,
    el("button", { onclick: () => remove(s.name), title: "remove it (then save)" }, "×"))));
  if (!items.length) list.replaceChildren(el("li", { class: "empty" }, "none"));
}

function alertText(a) {
  const what = { zone_enter: "entered", zone_leave: "left", line_cross: "crossed", dwell: "dwells in" }[a.type] || a.type;
  const extra = a.type === "line_cross" ? ` (${a.direction})`
    : a.type === "dwell" && a.dwell_s != null ? ` for ${fmt(a.dwell_s, 1, " s")}` : "";
  return `object ${a.obj_id}${a.label ? ` (${a.label})` : ""} ${what} ${a.zone}${extra}`;
}

export function alerts(list, items, onPick) {
  list.replaceChildren(...items.slice(0, 500).map((a) => el("li", { class: `alert ${a.type}`, "data-key": a.key,
    title: `frame ${a.frame_idx}`, onclick: () => onPick(a) },
  el("time", {}, clock(a.captured_at || a.at)), " ", el("span", {}, alertText(a)),
  ` · frame ${a.frame_idx}`)));
  if (!items.length) list.replaceChildren(el("li", { class: "empty" }, "none yet"));
}
