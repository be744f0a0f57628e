// COCO RLE, as the result stream writes masks ({size: [h, w], counts}): `counts` is pycocotools' compressed
// string (rleFrString in its maskApi.c), run lengths of 0s then 1s in COLUMN-major order (down the first
// column, then the next).

// The run lengths of a compressed counts string. Each run is 5 bits a character (offset by 48), a 6th bit
// saying another character follows; the last character's 5th bit is the sign; from the third run on, a run is
// stored as its difference from the run two before it. Arithmetic in plain numbers, not 32-bit bit operations,
// so that a run of a large mask never wraps.
export function decodeCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x -= 2 ** (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// Set every pixel of the mask to `rgba` (a packed 32-bit pixel: see packColour) in `pixels`, a Uint32Array over
// an ImageData of `width` x `height`. Returns the number of pixels set.
export function paintCounts(pixels, width, height, counts, rgba) {
  let start = 0;
  let set = 0;
  for (let r = 0; r < counts.length; r += 1) {
    const run = counts[r];
    if (r % 2 === 1 && run > 0) {
      let x = Math.floor(start / height);
      let y = start - x * height;
      for (let n = 0; n < run && x < width; n += 1) {
        pixels[y * width + x] = rgba;
        y += 1;
        if (y === height) {
          y = 0;
          x += 1;
        }
      }
      set += run;
    }
    start += run;
  }
  return set;
}

// A colour as one pixel of a Uint32Array view over ImageData bytes (R, G, B, A in memory order).
export function packColour(r, g, b, a) {
  const probe = new Uint8ClampedArray([r, g, b, a]);
  return new Uint32Array(probe.buffer)[0];
}

// The mask as a 0/1 array in row-major order (for tests and hit testing).
export function decodeMask(rle) {
  const [height, width] = rle.size;
  const out = new Uint8Array(width * height);
  const counts = decodeCounts(rle.counts);
  const pixels = new Uint32Array(width * height);
  paintCounts(pixels, width, height, counts, 1);
  for (let i = 0; i < out.length; i += 1) out[i] = pixels[i];
  return out;
}
