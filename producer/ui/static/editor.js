// Drawing zones (polygons: click each corner, then finish) and lines (two clicks), in frame pixels, and the
// body of PUT /api/jobs/{id}/zones. Names: what the name field says, else zone-N / line-N; each name once.
export class ZoneEditor {
  constructor(onChange) {
    this.onChange = onChange;
    this.zones = [];
    this.lines = [];
    this.mode = "point"; // point | zone | line
    this.draft = { kind: null, points: [] };
    this.dirty = false;
  }

  load(doc) {
    this.zones = (doc.zones || []).map((z) => ({ name: z.name, points: z.points }));
    this.lines = (doc.lines || []).map((l) => ({ name: l.name, points: l.points }));
    this.dirty = false;
    this.onChange();
  }

  setMode(mode) {
    this.mode = mode;
    this.draft = { kind: mode === "point" ? null : mode, points: [] };
    this.onChange();
  }

  // A click in zone or line mode; returns an error to show, or "".
  click(x, y, name) {
    const point = [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
    const last = this.draft.points[this.draft.points.length - 1];
    if (last && Math.hypot(last[0] - x, last[1] - y) < 1) return ""; // a double-click's second click
    this.draft.points.push(point);
    this.onChange();
    return this.mode === "line" && this.draft.points.length === 2 ? this.finish(name) : "";
  }

  finish(name) {
    const { kind, points } = this.draft;
    if (!kind) return "";
    if (kind === "zone" && points.length < 3) return "a zone needs 3 corners or more: click them, then finish";
    if (kind === "line" && points.length !== 2) return "a line is two clicks";
    const taken = new Set([...this.zones, ...this.lines].map((s) => s.name));
    let chosen = (name || "").trim();
    if (!chosen) {
      let n = 1;
      while (taken.has(`${kind}-${n}`)) n += 1;
      chosen = `${kind}-${n}`;
    }
    if (taken.has(chosen)) return `the name ${chosen} is taken: give another`;
    (kind === "zone" ? this.zones : this.lines).push({ name: chosen, points: points.slice() });
    this.draft = { kind, points: [] };
    this.dirty = true;
    this.onChange();
    return "";
  }

  cancel() {
    this.draft = { kind: this.draft.kind, points: [] };
    this.onChange();
  }

  remove(name) {
    this.zones = this.zones.filter((z) => z.name !== name);
    this.lines = this.lines.filter((l) => l.name !== name);
    this.dirty = true;
    this.onChange();
  }

  body() {
    return { zones: this.zones, lines: this.lines };
  }
}
