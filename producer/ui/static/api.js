// Talking to the viewer's API: JSON in and out, and its refusals ({"error": "..."}) shown on the page.
export async function getJSON(url) {
  const reply = await fetch(url, { cache: "no-store" });
  return read(reply);
}

export async function send(method, url, body) {
  const reply = await fetch(url, { method, headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  return read(reply);
}

async function read(reply) {
  const text = await reply.text();
  let doc = null;
  try {
    doc = JSON.parse(text);
  } catch {
    doc = null;
  }
  if (!reply.ok) throw new Error((doc && doc.error) || `${reply.status} ${reply.statusText}`);
  return doc;
}

export function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export function fmt(value, digits = 2, unit = "") {
  if (value === null || value === undefined || value === "") return "–";
  return typeof value === "number" ? `${Number.isInteger(value) ? value : value.toFixed(digits)}${unit}` : `${value}${unit}`;
}

export function clock(unixS) {
  if (!unixS) return "–";
  return new Date(unixS * 1000).toLocaleTimeString([], { hour12: false });
}
