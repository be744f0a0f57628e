// What is drawn over the picture: each object's mask in its colour (the render's colours:
// worker/output/draw.py), its id and label, the zones and lines, a zone being drawn, and the points just clicked.
// The canvas has the job's frame size; CSS scales it with the video, so one canvas pixel is one frame pixel.
import { decodeCounts, packColour, paintCounts } from "./rle.js";

// worker/output/draw.py PALETTE_BGR, as RGB
const PALETTE = [[255, 128, 0], [0, 64, 255], [255, 0, 255], [255, 0, 0], [0, 255, 255], [255, 255, 0],
  [128, 0, 255], [255, 0, 128], [160, 64, 0], [128, 128, 255]];
export const MASK_ALPHA = 130;

function hsv(h, s, v) {
  const f = (n) => {
    const k = (n + h / 60) % 6;
    return Math.round(255 * (v - v * s * Math.max(0, Math.min(k, 4 - k, 1))));
  };
  return [f(5), f(3), f(1)];
}

// The object's colour: the palette first, then draw.py's hashed hue (OpenCV's 0..179 scale, greens skipped).
export function colourOf(objId) {
  if (objId >= 0 && objId < PALETTE.length) return PALETTE[objId];
  const h = Number((BigInt(objId) * 2654435761n) & 0xffffffffn);
  const hue = (h % 150) + (h % 150 >= 45 ? 30 : 0);
  return hsv(hue * 2, 1, 1);
}

export function cssColour(objId, alpha = 1) {
  const [r, g, b] = colourOf(objId);
  return `rgba(${r}, ${g}, ${b}, ${alpha})`;
}

export class Overlay {
  constructor(canvas, width, height) {
    this.canvas = canvas;
    canvas.width = width;
    canvas.height = height;
    this.width = width;
    this.height = height;
    this.ctx = canvas.getContext("2d", { willReadFrequently: true });
    this.image = this.ctx.createImageData(width, height);
    this.pixels = new Uint32Array(this.image.data.buffer);
  }

  // Draw one frame's objects (a Map obj_id -> object, or null), the zones and the marks; returns the ids of
  // the objects whose masks were drawn (at least one pixel).
  paint({ objects, zones, lines, draft, marks, showMasks, hidden }) {
    const { ctx, width, height } = this;
    this.pixels.fill(0);
    const drawn = [];
    if (objects && showMasks) {
      for (const obj of objects.values()) {
        if (hidden && hidden.has(obj.obj_id)) continue;
        const [h, w] = obj.mask.size;
        if (w !== width || h !== height) continue;
        obj.runs = obj.runs || decodeCounts(obj.mask.counts);
        const [r, g, b] = colourOf(obj.obj_id);
        if (paintCounts(this.pixels, width, height, obj.runs, packColour(r, g, b, MASK_ALPHA)) > 0) {
          drawn.push(obj.obj_id);
        }
      }
    }
    if (drawn.length) this.outline(objects, drawn);
    ctx.putImageData(this.image, 0, 0);
    const font = Math.max(10, Math.round(height / 28));
    ctx.font = `${font}px system-ui, sans-serif`;
    ctx.lineWidth = Math.max(1.5, height / 300);
    if (objects && showMasks) {
      for (const obj of objects.values()) {
        if (!drawn.includes(obj.obj_id)) continue;
        const text = obj.label ? `${obj.obj_id} ${obj.label}` : `${obj.obj_id}`;
        this.tag(text, obj.bbox[0], obj.bbox[1], cssColour(obj.obj_id));
      }
    }
    for (const zone of zones || []) this.polygon(zone.points, zone.name, "rgba(255, 215, 0, 0.95)", true);
    for (const line of lines || []) this.line(line.points, line.name);
    if (draft && draft.points.length) this.polygon(draft.points, "", "rgba(0, 200, 255, 0.95)", false);
    for (const mark of marks || []) this.mark(mark);
    return drawn;
  }

  // Each mask's edge opaque (the pixels with a neighbour of another value), within the drawn objects' boxes.
  outline(objects, drawn) {
    const { width: w, height: h, pixels } = this;
    this.copy = this.copy || new Uint32Array(pixels.length);
    const src = this.copy;
    src.set(pixels);
    const opaque = packColour(0, 0, 0, 255);
    let [left, top, right, bottom] = [w, h, 0, 0];
    for (const id of drawn) {
      const [x0, y0, x1, y1] = objects.get(id).bbox;
      [left, top, right, bottom] = [Math.min(left, x0), Math.min(top, y0), Math.max(right, x1), Math.max(bottom, y1)];
    }
    [left, top, right, bottom] = [Math.max(0, Math.floor(left)), Math.max(0, Math.floor(top)),
      Math.min(w, Math.ceil(right)), Math.min(h, Math.ceil(bottom))];
    for (let y = top; y < bottom; y += 1) {
      for (let x = left; x < right; x += 1) {
        const i = y * w + x;
        const v = src[i];
        if (v && ((x > 0 && src[i - 1] !== v) || (x < w - 1 && src[i + 1] !== v)
            || (y > 0 && src[i - w] !== v) || (y < h - 1 && src[i + w] !== v))) pixels[i] = v | opaque;
      }
    }
  }

  tag(text, x, y, colour) {
    const { ctx } = this;
    const pad = 2;
    const w = ctx.measureText(text).width + 2 * pad;
    const h = parseInt(ctx.font, 10) + 2 * pad;
    const top = Math.max(0, y - h);
    ctx.fillStyle = "rgba(20, 20, 20, 0.8)";
    ctx.fillRect(x, top, w, h);
    ctx.fillStyle = colour;
    ctx.textBaseline = "top";
    ctx.fillText(text, x + pad, top + pad);
  }

  polygon(points, name, colour, closed) {
    const { ctx } = this;
    ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    if (closed) {
      ctx.closePath();
      ctx.fillStyle = "rgba(255, 215, 0, 0.12)";
      ctx.fill();
    }
    ctx.strokeStyle = colour;
    ctx.stroke();
    for (const [x, y] of closed ? [] : points) ctx.strokeRect(x - 2, y - 2, 4, 4);
    if (name) this.tag(name, points[0][0], points[0][1], colour);
  }

  // A line, named at its first point, with an arrow from its middle to its "in" side: crossing from its left to
  // its right (walking from its first point to its second, y down) is `in` (producer/zones.py).
  line(points, name) {
    const { ctx } = this;
    const [[x0, y0], [x1, y1]] = points;
    const colour = "rgba(0, 230, 255, 0.95)";
    const len = Math.hypot(x1 - x0, y1 - y0) || 1;
    const [mx, my] = [(x0 + x1) / 2, (y0 + y1) / 2];
    const [nx, ny] = [-(y1 - y0) / len, (x1 - x0) / len];
    const arrow = Math.max(10, this.height / 14);
    const [tx, ty] = [mx + nx * arrow, my + ny * arrow];
    const head = arrow / 3;
    ctx.strokeStyle = colour;
    ctx.beginPath();
    ctx.moveTo(x0, y0);
    ctx.lineTo(x1, y1);
    ctx.moveTo(mx, my);
    ctx.lineTo(tx, ty);
    ctx.lineTo(tx - nx * head + ny * head * 0.6, ty - ny * head - nx * head * 0.6);
    ctx.moveTo(tx, ty);
    ctx.lineTo(tx - nx * head - ny * head * 0.6, ty - ny * head + nx * head * 0.6);
    ctx.stroke();
    this.tag(name, x0, y0 + parseInt(ctx.font, 10) + 6, colour);
    ctx.fillStyle = colour;
    ctx.textBaseline = "middle";
    ctx.textAlign = nx < 0 ? "right" : "left";
    ctx.fillText("in", tx + nx * 4, ty + ny * 4);
    ctx.textAlign = "left";
  }

  mark({ x, y, positive }) {
    const { ctx } = this;
    const r = Math.max(3, this.height / 90);
    ctx.fillStyle = positive ? "rgba(40, 220, 40, 0.95)" : "rgba(240, 40, 40, 0.95)";
    ctx.strokeStyle = "white";
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.fill();
    ctx.stroke();
  }
}
