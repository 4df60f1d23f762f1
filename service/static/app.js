// vident live demo: streams a sample clip, a local video file or the webcam over WS /v1/stream
// (protocol: docs/protocol.md) and shows input, restored frame, mask overlay and the previous input
// warped by the predicted homography. Plain JS, no build step, nothing fetched from the internet.
// When the server goes away mid-stream (behind a load balancer: its replica died), the page connects
// again with back-off, starts a new stream on the replica it reaches and counts the frames lost.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_IN_FLIGHT = 2; // two frames unanswered keep the server busy without making it drop any
const RECONNECT = { attempts: 8, firstDelayMs: 500, maxDelayMs: 8000 }; // as service.client.Reconnect
const REFUSED_FOR_GOOD = new Set([1008, 4404, 4500]); // key or origin, unknown model, model failed: no retry
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- geometry ---------------------------------------------------------------------------------------------------

function invert3x3(m) {
  const [a, b, c] = m[0], [d, e, f] = m[1], [g, h, i] = m[2];
  const A = e * i - f * h, B = -(d * i - f * g), C = d * h - e * g;
  const det = a * A + b * B + c * C;
  if (!Number.isFinite(det) || Math.abs(det) < 1e-12) return null;
  return [
    [A / det, -(b * i - c * h) / det, (b * f - c * e) / det],
    [B / det, (a * i - c * g) / det, -(a * f - c * d) / det],
    [C / det, -(a * h - b * g) / det, (a * e - b * d) / det],
  ];
}

// Warps `src` (ImageData of the previous frame) into the current frame's pixels with H_{t-1->t}.
// Inverse mapping, projective-exact: the output pixel centred at p = (x + 0.5, y + 0.5) samples the source
// at H^-1 p, bilinearly, zeros outside - the pixel convention of models/layers.py (warp_by_homography).
function warpHomography(src, H, outWidth, outHeight) {
  const out = new ImageData(outWidth, outHeight);
  const inv = invert3x3(H);
  if (!inv) return out;
  const sw = src.width, sh = src.height, s = src.data, o = out.data;
  for (let y = 0; y < outHeight; y++) {
    const py = y + 0.5;
    for (let x = 0; x < outWidth; x++) {
      const px = x + 0.5;
      const X = inv[0][0] * px + inv[0][1] * py + inv[0][2];
      const Y = inv[1][0] * px + inv[1][1] * py + inv[1][2];
      const Z = inv[2][0] * px + inv[2][1] * py + inv[2][2];
      const sx = X / Z - 0.5, sy = Y / Z - 0.5; // continuous -> index coordinates (pixel centres)
      const x0 = Math.floor(sx), y0 = Math.floor(sy), fx = sx - x0, fy = sy - y0;
      const k = (y * outWidth + x) * 4;
      o[k + 3] = 255;
      if (!(x0 >= -1 && y0 >= -1 && x0 < sw && y0 < sh)) continue;
      const weights = [(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy];
      const xs = [x0, x0 + 1, x0, x0 + 1], ys = [y0, y0, y0 + 1, y0 + 1];
      let r = 0, g = 0, b = 0;
      for (let n = 0; n < 4; n++) {
        if (xs[n] < 0 || ys[n] < 0 || xs[n] >= sw || ys[n] >= sh) continue; // zero padding
        const j = (ys[n] * sw + xs[n]) * 4, w = weights[n];
        r += w * s[j]; g += w * s[j + 1]; b += w * s[j + 2];
      }
      o[k] = r; o[k + 1] = g; o[k + 2] = b;
    }
  }
  return out;
}

// ---- drawing ----------------------------------------------------------------------------------------------------

function draw(canvasId, image) {
  const canvas = $(canvasId);
  if (canvas.width !== image.width || canvas.height !== image.height) {
    canvas.width = image.width;
    canvas.height = image.height;
  }
  const ctx = canvas.getContext("2d");
  if (image instanceof ImageData) ctx.putImageData(image, 0, 0);
  else ctx.drawImage(image, 0, 0);
}

function pixelsOf(bitmap) {
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  return ctx.getImageData(0, 0, bitmap.width, bitmap.height);
}

function maskOverlay(restored, mask) {
  // teeth in cyan over the restored frame, opacity = probability / 2
  const out = new ImageData(new Uint8ClampedArray(restored.data), restored.width, restored.height);
  const o = out.data, m = mask.data;
  for (let k = 0; k < o.length; k += 4) {
    const a = (m[k] / 255) * 0.5;
    o[k] = o[k] * (1 - a);
    o[k + 1] = o[k + 1] * (1 - a) + 255 * a;
    o[k + 2] = o[k + 2] * (1 - a) + 255 * a;
  }
  return out;
}

// ---- session ----------------------------------------------------------------------------------------------------

const session = {
  ws: null, running: false, timer: null, source: null,
  sent: 0, processed: 0, dropped: 0, frameErrors: 0, errors: 0, skipped: 0, lost: 0, reconnects: 0,
  conn: null, // this connection's counts: its seq numbers start at 0 and its server counts its drops
  sentAt: new Map(), inputs: new Map(), pending: null, doneTimes: [], latencies: [],
  randomWeights: false,
};

function newConnection() {
  return { sent: 0, processed: 0, dropped: 0, frameErrors: 0, droppedBefore: session.dropped };
}

function log(text) {
  $("log").textContent = (text + "\n" + $("log").textContent).slice(0, 4000);
}

function setStatus(text) { $("status").textContent = text; }

function resetCounters() {
  Object.assign(session, {
    sent: 0, processed: 0, dropped: 0, frameErrors: 0, errors: 0, skipped: 0, lost: 0, reconnects: 0,
  });
  session.conn = newConnection();
  session.sentAt.clear(); session.inputs.clear(); session.doneTimes = []; session.latencies = [];
  session.pending = null;
}

function inFlight() {
  const c = session.conn;
  return c ? c.sent - c.processed - c.dropped - c.frameErrors : 0;
}

function socketUrl(model) {
  const params = new URLSearchParams({ model });
  const key = new URLSearchParams(location.search).get("api_key");
  if (key) params.set("api_key", key);
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/stream?${params}`;
}

function connect(model) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(socketUrl(model));
    ws.binaryType = "arraybuffer";
    ws.onmessage = (event) => {
      if (typeof event.data === "string") {
        const message = JSON.parse(event.data);
        if (message.type === "hello") {
          ws.send(JSON.stringify({ type: "config", output_format: $("format").value }));
        } else if (message.type === "config_ok") {
          resolve(ws);
        } else onMessage(message);
      } else onBinary(event.data);
    };
    ws.onerror = () => reject(new Error("WebSocket error"));
    ws.onclose = (event) => {
      if (event.code !== 1000) log(`connection closed: ${event.code} ${event.reason}`);
      reject(new Error(`closed ${event.code} ${event.reason}`));
      if (ws !== session.ws) return; // a connect that failed: its caller tries again or gives up
      if (session.running && !REFUSED_FOR_GOOD.has(event.code)) connectionLost();
      else stop(`closed (${event.code}${event.reason ? " " + event.reason : ""})`);
    };
  });
}

// The server went away mid-stream: the frames it had not answered are lost; connect again (a new session,
// so a new stream: the model's state starts over) while the source keeps running.
function connectionLost() {
  session.lost += inFlight();
  session.ws = null;
  session.conn = null;
  session.sentAt.clear(); session.inputs.clear(); session.pending = null;
  $("lost").textContent = session.lost;
  reconnect(0);
}

async function reconnect(attempt) {
  if (!session.running) return;
  if (attempt >= RECONNECT.attempts) {
    stop(`the server went away; gave up after ${RECONNECT.attempts} tries`);
    return;
  }
  const delay = Math.min(RECONNECT.firstDelayMs * 2 ** attempt, RECONNECT.maxDelayMs);
  setStatus(`connection lost: reconnecting in ${(delay / 1000).toFixed(1)} s (try ${attempt + 1} of ${RECONNECT.attempts})`);
  await sleep(delay);
  if (!session.running) return;
  try {
    const conn = newConnection();
    session.ws = await connect($("model").value);
    session.conn = conn;
    session.reconnects++;
    $("reconnects").textContent = session.reconnects;
    setStatus(`reconnected: a new stream (${session.lost} frames lost so far)`);
  } catch (error) {
    session.ws = null;
    log(`reconnect failed: ${error.message}`);
    reconnect(attempt + 1);
  }
}

function onMessage(message) {
  if (message.type === "result") {
    session.pending = { header: message, parts: [] };
    if (message.parts.length === 0) finishResult();
  } else if (message.type === "error") {
    session.errors++;
    if (message.seq !== null) {
      session.frameErrors++;
      if (session.conn) session.conn.frameErrors++;
    }
    $("errors").textContent = session.errors;
    log(`error ${message.code}: ${message.message}`);
  } else if (message.type === "bye") {
    setStatus("server said bye");
  }
}

function onBinary(data) {
  if (!session.pending) { log("protocol error: image without header"); return; }
  session.pending.parts.push(data);
  if (session.pending.parts.length === session.pending.header.parts.length) finishResult();
}

async function finishResult() {
  const { header, parts } = session.pending;
  session.pending = null;
  session.processed++;
  if (session.conn) {
    session.conn.processed++;
    session.conn.dropped = header.dropped; // the server counts the drops of its own session
    session.dropped = session.conn.droppedBefore + header.dropped;
  }
  const now = performance.now();
  const sentAt = session.sentAt.get(header.seq);
  if (sentAt !== undefined) session.latencies.push(now - sentAt);
  if (session.latencies.length > 30) session.latencies.shift();
  session.doneTimes.push(now);
  while (session.doneTimes.length && now - session.doneTimes[0] > 2000) session.doneTimes.shift();
  for (const seq of session.sentAt.keys()) if (seq <= header.seq) session.sentAt.delete(seq);

  const images = {};
  await Promise.all(header.parts.map(async (part, i) => {
    const blob = new Blob([parts[i]], { type: `image/${part.format}` });
    images[part.name] = pixelsOf(await createImageBitmap(blob));
  }));
  const input = session.inputs.get(header.seq);
  if (input) draw("input", input);
  draw("restored", images.restored);
  if (images.teeth_mask) draw("overlay", maskOverlay(images.restored, images.teeth_mask));
  const previous = header.prev_seq === null ? undefined : session.inputs.get(header.prev_seq);
  if (header.homography && previous) {
    draw("warped", warpHomography(previous, header.homography, header.width, header.height));
  } else if (header.homography && input) {
    draw("warped", input); // first frame of a stream: H is the identity
  }
  for (const seq of session.inputs.keys()) if (seq < header.seq) session.inputs.delete(seq);
  if (header.homography) {
    $("homography").textContent = "H = " + header.homography.map((row) => row.map((v) => v.toFixed(4)).join("  ")).join("\n    ");
  }
  showStats(header);
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length ? sorted[Math.floor(sorted.length / 2)] : NaN;
}

function showStats(header) {
  const span = session.doneTimes.length > 1 ? (session.doneTimes.at(-1) - session.doneTimes[0]) / 1000 : 0;
  $("processed").textContent = session.processed;
  $("fps").textContent = span > 0 ? ((session.doneTimes.length - 1) / span).toFixed(1) : "0.0";
  $("latency").textContent = session.latencies.length ? median(session.latencies).toFixed(0) : "-";
  $("server-ms").textContent = header.timings_ms.total.toFixed(0);
  $("dropped").textContent = session.dropped;
  $("skipped").textContent = session.skipped;
  $("lost").textContent = session.lost;
  $("reconnects").textContent = session.reconnects;
}

// ---- sources: each gives {fps, next() -> {bytes, pixels, restart}} ----------------------------------------------

async function sampleSource(entry) {
  const frames = [];
  for (let i = 0; i < entry.frames; i++) {
    const url = `/static/${entry.path}${String(i).padStart(6, "0")}.jpg`;
    const response = await fetch(url);
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    const bytes = await response.arrayBuffer();
    const pixels = pixelsOf(await createImageBitmap(new Blob([bytes], { type: "image/jpeg" })));
    frames.push({ bytes, pixels });
  }
  let index = 0;
  return {
    fps: entry.fps,
    next: async () => {
      const frame = frames[index];
      const restart = index === 0; // the clip loops: a scene cut for the model
      index = (index + 1) % frames.length;
      return { ...frame, restart };
    },
    close: () => {},
  };
}

async function videoSource(kind) {
  const video = $("video");
  let stream = null;
  if (kind === "webcam") {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    video.srcObject = stream;
  } else {
    const file = $("file").files[0];
    if (!file) throw new Error("choose a video file first");
    video.srcObject = null;
    video.src = URL.createObjectURL(file);
    video.loop = true;
  }
  await video.play();
  const width = Math.min(Number($("width").value), video.videoWidth);
  const height = Math.round((video.videoHeight * width) / video.videoWidth);
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  let first = true;
  return {
    fps: 15,
    next: async () => {
      ctx.drawImage(video, 0, 0, width, height);
      const pixels = ctx.getImageData(0, 0, width, height);
      const blob = await canvas.convertToBlob({ type: "image/jpeg", quality: 0.9 });
      const restart = first;
      first = false;
      return { bytes: await blob.arrayBuffer(), pixels, restart };
    },
    close: () => {
      video.pause();
      if (stream) stream.getTracks().forEach((t) => t.stop());
    },
  };
}

async function tick() {
  if (!session.running || session.ticking || !session.conn) return; // !conn: reconnecting
  if (inFlight() >= MAX_IN_FLIGHT) {
    session.skipped++; // newest frame wins on this side too: the server is busy, skip this one
    return;
  }
  session.ticking = true; // a slow capture must not overlap the next tick
  try {
    const frame = await session.source.next();
    const conn = session.conn;
    if (!session.running || !conn) return;
    if (frame.restart && conn.sent > 0) session.ws.send(JSON.stringify({ type: "reset" }));
    session.inputs.set(conn.sent, frame.pixels); // keyed by this connection's seq
    session.sentAt.set(conn.sent, performance.now());
    session.ws.send(frame.bytes);
    conn.sent++;
    session.sent++;
  } finally {
    session.ticking = false;
  }
}

async function start() {
  $("start").disabled = true;
  $("log").textContent = "";
  resetCounters();
  try {
    setStatus("loading the source...");
    const kind = $("source").value;
    session.source = kind === "sample" ? await sampleSource(session.samples[$("sample").value]) : await videoSource(kind);
    setStatus("connecting...");
    session.ws = await connect($("model").value);
    session.running = true;
    session.timer = setInterval(tick, 1000 / session.source.fps);
    $("stop").disabled = false;
    $("reset").disabled = false;
    setStatus(`streaming ${kind} at up to ${session.source.fps} FPS`);
  } catch (error) {
    log(String(error));
    stop(`failed: ${error.message}`);
  }
}

function stop(reason = "stopped") {
  session.running = false;
  clearInterval(session.timer);
  if (session.source) session.source.close();
  if (session.ws && session.ws.readyState === WebSocket.OPEN) session.ws.send(JSON.stringify({ type: "close" }));
  $("start").disabled = false;
  $("stop").disabled = true;
  $("reset").disabled = true;
  setStatus(reason);
}

async function init() {
  $("source").onchange = () => {
    $("sample-pick").hidden = $("source").value !== "sample";
    $("file-pick").hidden = $("source").value !== "file";
  };
  $("start").onclick = start;
  $("stop").onclick = () => stop();
  $("reset").onclick = () => session.ws && session.ws.send(JSON.stringify({ type: "reset" }));
  const key = new URLSearchParams(location.search).get("api_key");
  const headers = key ? { "X-API-Key": key } : {};
  // The server loads and warms its default model before /readyz turns 200: wait, so the model line
  // and the random-weights warning below describe the model that will answer. "full" (every session
  // taken) has the model loaded: the page initialises, and a stream started meanwhile is refused.
  for (;;) {
    const ready = await fetch("/readyz").then((r) => r.json()).catch(() => ({ status: "unreachable" }));
    if (ready.ready || ready.status === "failed" || ready.status === "full") break;
    setStatus(`waiting for the server (${ready.status})`);
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
  const [samples, models] = await Promise.all([
    fetch("/static/samples/index.json").then((r) => r.json()),
    fetch("/v1/models", { headers }).then((r) => r.json()),
  ]);
  session.samples = samples;
  samples.forEach((s, i) => $("sample").add(new Option(`${s.name} (${s.frames} frames, ${s.width}x${s.height})`, i)));
  for (const m of models.models.filter((m) => m.allowed)) $("model").add(new Option(m.name, m.name, false, m.default));
  const current = models.models.find((m) => m.default);
  $("server").textContent = current && current.loaded
    ? `server model ${current.name}: ${current.backend} on ${current.device} (${current.precision})`
    : `server model ${models.default} (loading or loaded on first use)`;
  if (current && current.random_weights) {
    $("warning").hidden = false;
    $("warning").textContent = "This server runs RANDOM weights (no trained checkpoint yet): restored frames, masks "
      + "and homographies are not meaningful, but the pipeline is the real one.";
  }
  setStatus("ready");
}

window.vident = { warpHomography, invert3x3, session, start, stop };
init().catch((error) => { log(String(error)); setStatus("failed to initialise"); });
