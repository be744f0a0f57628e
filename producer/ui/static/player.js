// The picture under the masks. Each player calls onFrame(key) as a new picture is shown: {idx} for a file job
// (the frame index), {time} for a live job (the capture time of the picture shown, Unix seconds).
//
// FilePlayer: a <video> of the job's source file, else of its render (the browser may not play the source's
// codec or container): frame = round((mediaTime - offset) * fps) for each frame presented
// (requestVideoFrameCallback); `offset` is where the job's frame 0 is in that video (a job submitted with
// --start; 0 for the render). A job's fps is its source's over its stride, so a strided job maps too.
// FramesPlayer: the job's JPEG frames at its rate, while they exist. LivePlayer: the live preview (HLS of every
// captured frame) through hls.js, or natively (Safari); its playingDate is the capture time of the frame
// shown. NewestFramePlayer: a live job without a preview: its newest JPEG, polled.

function each(video, callback) {
  if (!video.requestVideoFrameCallback) {
    const tick = () => { callback(null); requestAnimationFrame(tick); };
    requestAnimationFrame(tick);
    return;
  }
  const step = (_now, meta) => { callback(meta); video.requestVideoFrameCallback(step); };
  video.requestVideoFrameCallback(step);
}

export class FilePlayer {
  constructor(video, sources, fps, onFrame, onGiveUp) {
    Object.assign(this, { video, sources: sources.filter((s) => s.url), fps, onFrame, onGiveUp, kind: null });
    this.shown = 0;
    this.offset = 0;
    const at = (t, exact) => (exact ? Math.round((t - this.offset) * fps) : Math.floor((t - this.offset) * fps + 1e-3));
    video.addEventListener("error", () => this.next());
    video.addEventListener("loadeddata", () => this.report(at(video.currentTime, false)));
    video.addEventListener("seeked", () => this.report(at(video.currentTime, false)));
    each(video, (meta) => this.report(meta ? at(meta.mediaTime, true) : at(video.currentTime, false)));
  }

  start() { this.next(); }

  next() {
    const source = this.sources.shift();
    if (!source) { this.kind = null; this.onGiveUp(); return; }
    this.kind = source.kind;
    this.offset = source.offset || 0;
    this.video.src = source.url;
    this.video.load();
  }

  report(idx) {
    if (idx === this.shown && this.reported) return;
    this.shown = idx;
    this.reported = true;
    this.onFrame({ idx });
  }

  get playing() { return !this.video.paused; }
  get lastFrame() { return Math.max(0, Math.round((this.video.duration - this.offset) * this.fps) - 1 || 0); }
  play() { return this.video.play(); }
  pause() { this.video.pause(); }
  seek(idx) { this.video.currentTime = this.offset + (Math.max(0, idx) + 0.5) / this.fps; }
  step(delta) { this.pause(); this.seek(this.shown + delta); }
}

export class FramesPlayer {
  constructor(img, urlOf, fps, available, onFrame, onMissing) {
    Object.assign(this, { img, urlOf, fps, available, onFrame, onMissing, kind: "frames", shown: 0, timer: null });
    img.addEventListener("load", () => this.onFrame({ idx: this.shown }));
    img.addEventListener("error", () => this.onMissing(this.shown));
  }

  start() { this.seek(0); }
  get playing() { return this.timer !== null; }
  get lastFrame() { return this.available(); }

  seek(idx) {
    this.shown = Math.max(0, Math.min(idx, Math.max(0, this.available())));
    this.img.src = this.urlOf(this.shown);
  }

  play() {
    if (this.timer) return;
    this.timer = setInterval(() => {
      if (this.shown < this.available()) this.seek(this.shown + 1);
    }, 1000 / this.fps);
  }

  pause() { clearInterval(this.timer); this.timer = null; }
  step(delta) { this.pause(); this.seek(this.shown + delta); }
}

function loadHls() {
  if (window.Hls) return Promise.resolve(window.Hls);
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = "/static/vendor/hls.min.js";
    script.onload = () => resolve(window.Hls);
    script.onerror = () => reject(new Error("cannot load /static/vendor/hls.min.js"));
    document.head.appendChild(script);
  });
}

export class LivePlayer {
  constructor(video, url, onFrame, onProblem) {
    Object.assign(this, { video, url, onFrame, onProblem, kind: "preview", hls: null });
    each(video, (meta) => {
      const date = this.playingDate();
      if (date !== null) this.onFrame({ time: date + (meta ? meta.mediaTime - video.currentTime : 0) });
    });
  }

  async start() {
    const { video } = this;
    video.muted = true;
    const Hls = await loadHls().catch((e) => { this.onProblem(e.message); return null; });
    if (Hls && Hls.isSupported()) {
      this.hls = new Hls({ liveSyncDurationCount: 2, manifestLoadingMaxRetry: 30, manifestLoadingRetryDelay: 1000 });
      this.hls.on(Hls.Events.ERROR, (_e, data) => {
        if (!data.fatal) return;
        this.onProblem(`the live preview stopped (${data.details}); retrying`);
        setTimeout(() => this.restart(), 2000);
      });
      this.hls.loadSource(this.url);
      this.hls.attachMedia(video);
    } else if (video.canPlayType("application/vnd.apple.mpegurl")) {
      video.src = this.url;
    } else {
      this.onProblem("this browser plays no HLS: the live preview cannot be shown");
      return;
    }
    video.play().catch(() => {});
  }

  restart() {
    if (this.hls) { this.hls.destroy(); this.hls = null; }
    this.start();
  }

  // Unix seconds of the picture shown (EXT-X-PROGRAM-DATE-TIME: the preview's capture times), or null.
  playingDate() {
    if (this.hls) return this.hls.playingDate ? this.hls.playingDate.getTime() / 1000 : null;
    const start = this.video.getStartDate ? this.video.getStartDate().getTime() : NaN;
    return Number.isFinite(start) ? start / 1000 + this.video.currentTime : null;
  }

  get playing() { return !this.video.paused; }
  play() { return this.video.play(); }
  pause() { this.video.pause(); }
  step() {}
  seek() {}
}

export class NewestFramePlayer {
  constructor(img, url, onFrame, onMissing) {
    Object.assign(this, { img, url, onFrame, onMissing, kind: "newest frame", timer: null, shownUrl: null });
  }

  start() { this.play(); }
  get playing() { return this.timer !== null; }

  play() {
    if (this.timer) return;
    const poll = async () => {
      const reply = await fetch(`${this.url}?t=${Date.now()}`, { cache: "no-store" }).catch(() => null);
      if (!reply || !reply.ok) { this.onMissing(); return; }
      const idx = Number(reply.headers.get("X-Frame-Idx"));
      const blob = await reply.blob();
      if (this.shownUrl) URL.revokeObjectURL(this.shownUrl);
      this.shownUrl = URL.createObjectURL(blob);
      this.img.onload = () => this.onFrame({ idx, newest: true });
      this.img.src = this.shownUrl;
    };
    poll();
    this.timer = setInterval(poll, 500);
  }

  pause() { clearInterval(this.timer); this.timer = null; }
  step() {}
  seek() {}
}
