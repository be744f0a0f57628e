// What the page knows of a job's results, built from its event stream (producer/ui/entries.py): each frame's
// objects (an `update` replaces or adds objects on a frame already received), each object's lifecycle, the
// alerts (newest first, one per key: delivery is at least once), the terminal entry.
const LIVE_KEEP_S = 180; // a live job's frames older than this (by capture time) are let go

export class Results {
  constructor(live) {
    this.live = live;
    this.frames = new Map(); // frame_idx -> {frame_idx, skipped, captured_at, objects: Map(obj_id -> object)}
    this.times = []; // a live job's processed frames in order: [captured_at, frame_idx]
    this.objects = new Map(); // obj_id -> {obj_id, label, state, from, note, source}
    this.alerts = [];
    this.alertKeys = new Set();
    this.started = null;
    this.terminal = null;
    this.lastFrame = -1;
  }

  // Take one entry; returns the frame index it changed, if any.
  apply(doc) {
    switch (doc.type) {
      case "started":
        this.started = doc;
        for (const id of doc.obj_ids) this.touch(id, { state: "prompted", from: doc.first_frame ?? 0, source: "submit" });
        return null;
      case "frame":
        return this.frame(doc);
      case "update":
        return this.update(doc);
      case "object":
        if (doc.obj_id < 0) return null;  // a command's text phrase (change "text"), not an object
        this.touch(doc.obj_id, { state: doc.change, from: doc.frame_idx, note: doc.note, source: doc.source,
          ...(doc.label ? { label: doc.label } : {}) });
        return null;
      case "alert":
        return this.alert(doc);
      case "completed": case "failed": case "cancelled": case "dead":
        this.terminal = doc;
        return null;
      default:
        return null;
    }
  }

  touch(objId, change) {
    const known = this.objects.get(objId) || { obj_id: objId, label: "", state: "tracked", from: null, note: "" };
    this.objects.set(objId, { ...known, ...change });
  }

  frame(doc) {
    const objects = new Map(doc.objects.map((o) => [o.obj_id, o]));
    this.frames.set(doc.frame_idx, { frame_idx: doc.frame_idx, skipped: doc.skipped, captured_at: doc.captured_at,
      objects });
    this.lastFrame = Math.max(this.lastFrame, doc.frame_idx);
    for (const o of doc.objects) {
      if (!this.objects.has(o.obj_id)) this.touch(o.obj_id, { state: "tracked", from: doc.frame_idx });
      if (o.label) this.objects.get(o.obj_id).label = o.label;
    }
    if (this.live && !doc.skipped && doc.captured_at != null) {
      this.times.push([doc.captured_at, doc.frame_idx]);
      this.forgetOld(doc.captured_at - LIVE_KEEP_S);
    }
    return doc.frame_idx;
  }

  update(doc) {
    const known = this.frames.get(doc.frame_idx) || { frame_idx: doc.frame_idx, skipped: false, captured_at: null,
      objects: new Map() };
    const objects = new Map(known.objects);
    for (const o of doc.objects) objects.set(o.obj_id, o);
    this.frames.set(doc.frame_idx, { ...known, objects });
    return doc.frame_idx;
  }

  alert(doc) {
    const key = doc.alert.key || doc.entry_id;
    if (this.alertKeys.has(key)) return null;
    this.alertKeys.add(key);
    this.alerts.unshift({ ...doc.alert, entry_id: doc.entry_id });
    return null;
  }

  forgetOld(before) {
    let drop = 0;
    while (drop < this.times.length && this.times[drop][0] < before) drop += 1;
    if (!drop) return;
    const oldest = this.times[drop][1];
    this.times.splice(0, drop);
    for (const idx of this.frames.keys()) if (idx < oldest) this.frames.delete(idx);
  }

  at(frameIdx) {
    return this.frames.get(frameIdx) || null;
  }

  // A live job's frame shown at capture time `t` (Unix seconds): the newest processed frame captured at or
  // before it (half a frame's slack), if it is no older than `maxAgeS`; skipped frames keep the last masks.
  atTime(t, maxAgeS = 2.0) {
    const times = this.times;
    let lo = 0;
    let hi = times.length - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (times[mid][0] <= t + 0.02) {
        found = mid;
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    if (found < 0 || t - times[found][0] > maxAgeS) return null;
    return this.frames.get(times[found][1]) || null;
  }
}
