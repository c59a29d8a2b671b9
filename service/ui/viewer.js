// fundus-enhance viewer: talks only to the service that served it; keeps everything in this page.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  original: null,      // {blob, type, name}: the photograph as chosen
  input: null,         // what /enhance gets: the original or its degraded copy
  urls: {},            // object URLs of the images shown / offered for download
  vessels: null,       // ImageData of the vessel probability map
  scale: 1, x: 0, y: 0,
  natural: { w: 0, h: 0 },
};

// ------------------------------------------------------------------ talking to the service
function mediaType(file) {
  if (file.type) return file.type;
  const name = (file.name || "").toLowerCase();
  if (name.endsWith(".dcm")) return "application/dicom";
  if (name.endsWith(".tif") || name.endsWith(".tiff")) return "image/tiff";
  return "application/octet-stream";  // the service recognises the format itself
}

async function call(path, input) {
  const headers = { "Content-Type": input.type };
  const key = $("key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  let response;
  try {
    response = await fetch(path, { method: "POST", body: input.blob, headers });
  } catch (err) {
    throw new Error("The service could not be reached (" + err.message + ").");
  }
  if (!response.ok) {
    let message = "HTTP " + response.status;
    try {
      const body = await response.json();
      if (body.error) message = body.error.message + " (" + body.error.code + ", HTTP " + response.status + ")";
    } catch (_) { /* not JSON */ }
    if (response.status === 401) message += ". Enter a valid API key above.";
    throw new Error(message);
  }
  return { blob: await response.blob(), headers: response.headers };
}

// ------------------------------------------------------------------ status and figures
function setStatus(text) { $("status").textContent = text; }
function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}
function busy(on) {
  for (const id of ["enhance", "degrade", "reset"]) $(id).disabled = on || !state.original;
  document.body.setAttribute("aria-busy", on ? "true" : "false");
}

const FIGURES = [
  ["x-model-version", "model version"],
  ["server-timing", "Server-Timing"],
  ["x-fov", "field of view"],
  ["x-fov-confidence", "FOV confidence"],
  ["x-quality-before", "quality before"],
  ["x-quality-after", "quality after"],
  ["x-enhance-uncertainty", "uncertainty"],
  ["x-structure-fidelity", "structure fidelity"],
  ["x-batch-size", "batch size"],
];

function showFigures(headers, extra) {
  const list = $("figures");
  list.replaceChildren();
  const add = (label, value) => {
    const dt = document.createElement("dt"); dt.textContent = label;
    const dd = document.createElement("dd"); dd.textContent = value;
    list.append(dt, dd);
  };
  for (const [name, label] of FIGURES) {
    const value = headers.get(name);
    if (value) add(label, name === "server-timing" ? formatTiming(value) : value);
  }
  for (const [label, value] of extra) add(label, value);
}

function formatTiming(value) {
  return value.split(",").map((part) => {
    const [name, ...params] = part.trim().split(";");
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    return dur ? name + " " + Number(dur.slice(4)).toFixed(0) + " ms" : name;
  }).join(", ");
}

function offerDownload(kind, label, blob) {
  if (state.urls[kind]) URL.revokeObjectURL(state.urls[kind]);
  state.urls[kind] = URL.createObjectURL(blob);
  let item = document.querySelector(`#downloads [data-kind="${kind}"]`);
  if (!item) {
    item = document.createElement("li");
    item.dataset.kind = kind;
    item.append(document.createElement("a"));
    $("downloads").append(item);
  }
  const link = item.firstChild;
  link.href = state.urls[kind];
  link.download = kind + ".png";
  link.textContent = label;
  return state.urls[kind];
}

// ------------------------------------------------------------------ images
function loadImage(img, url) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not show the image"));
    img.src = url;
  });
}

async function showBefore(input) {
  const { blob } = await call("/render", input);
  const img = await loadImage($("before"), offerDownload("shown-input", "input as shown (PNG)", blob));
  state.natural = { w: img.naturalWidth, h: img.naturalHeight };
  for (const canvas of [$("overlay-before"), $("overlay-after")]) {
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  }
  $("after").removeAttribute("src");
  state.vessels = null;
  drawOverlay();
  fit();
}

async function vesselData(blob) {
  const bitmap = await createImageBitmap(blob);
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width; canvas.height = bitmap.height;
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  return context.getImageData(0, 0, bitmap.width, bitmap.height);
}

function drawOverlay() {
  const where = document.querySelector('input[name="overlay"]:checked').value;
  const threshold = Number($("threshold").value) / 100;
  $("threshold-value").textContent = threshold.toFixed(2);
  for (const side of ["before", "after"]) {
    const canvas = $("overlay-" + side);
    canvas.hidden = where !== side || !state.vessels;
    if (canvas.hidden) continue;
    const source = state.vessels;
    canvas.width = source.width; canvas.height = source.height;
    const out = canvas.getContext("2d").createImageData(source.width, source.height);
    const cut = threshold * 255;
    for (let i = 0; i < source.data.length; i += 4) {
      if (source.data[i] >= cut && source.data[i] > 0) {
        out.data[i] = 40; out.data[i + 1] = 255; out.data[i + 2] = 140; out.data[i + 3] = 150;
      }
    }
    canvas.getContext("2d").putImageData(out, 0, 0);
  }
}

// ------------------------------------------------------------------ actions
async function enhance() {
  if (!state.input) return;
  busy(true); showError(""); setStatus("Enhancing…");
  try {
    const enhanced = await call("/enhance?format=png", state.input);
    await loadImage($("after"), offerDownload("enhanced", "enhanced (PNG)", enhanced.blob));
    setStatus("Finding vessels…");
    const vessels = await call("/segment?format=png", state.input);
    offerDownload("vessels", "vessel probability (PNG)", vessels.blob);
    state.vessels = await vesselData(vessels.blob);
    showFigures(enhanced.headers, [["image", state.natural.w + " × " + state.natural.h]]);
    drawOverlay();
    setStatus("Done: enhanced " + (state.input === state.original ? "the original" : "the degraded copy") + ".");
    $("viewport").dataset.ready = "true";
  } catch (err) {
    showError(err.message); setStatus("Failed.");
  } finally {
    busy(false);
  }
}

async function degradeThenEnhance() {
  if (!state.original) return;
  busy(true); showError(""); setStatus("Degrading…");
  try {
    const types = [...document.querySelectorAll('input[name="type"]:checked')].map((box) => box.value);
    if (!types.length) throw new Error("Choose at least one degradation type.");
    const query = new URLSearchParams({ seed: String(Math.max(0, Math.floor(Number($("seed").value) || 0))),
      types: types.join(","), mode: $("mode").value, format: "png" });
    const degraded = await call("/degrade?" + query, state.original);
    offerDownload("degraded", "degraded (PNG)", degraded.blob);
    state.input = { blob: degraded.blob, type: "image/png", name: "degraded.png" };
    await showBefore(state.input);
  } catch (err) {
    showError(err.message); setStatus("Failed."); busy(false);
    return;
  }
  busy(false);
  await enhance();
}

async function choose(file) {
  if (!file) return;
  showError("");
  delete $("viewport").dataset.ready;
  state.original = { blob: file, type: mediaType(file), name: file.name };
  state.input = state.original;
  busy(true); setStatus("Reading the photograph…");
  try {
    await showBefore(state.original);
    busy(false);
    await enhance();
  } catch (err) {
    showError(err.message); setStatus("Failed."); busy(false);
  }
}

// ------------------------------------------------------------------ view: split, zoom, pan
function applyView() {
  const transform = `translate(${state.x}px, ${state.y}px) scale(${state.scale})`;
  $("stage-before").style.transform = transform;
  $("stage-after").style.transform = transform;
  $("zoom").value = String(Math.round(Math.log2(state.scale) * 100));
  $("zoom-value").textContent = Math.round(state.scale * 100) + " %";
}

function zoomTo(scale, cx, cy) {
  const viewport = $("viewport").getBoundingClientRect();
  const px = cx ?? viewport.width / 2, py = cy ?? viewport.height / 2;
  const s = Math.min(8, Math.max(1 / 16, scale));
  state.x = px - (px - state.x) * (s / state.scale);
  state.y = py - (py - state.y) * (s / state.scale);
  state.scale = s;
  applyView();
}

function fit() {
  const viewport = $("viewport").getBoundingClientRect();
  if (!state.natural.w) return;
  state.scale = Math.min(viewport.width / state.natural.w, viewport.height / state.natural.h);
  state.x = (viewport.width - state.natural.w * state.scale) / 2;
  state.y = (viewport.height - state.natural.h * state.scale) / 2;
  applyView();
}

function native() { state.scale = 1; state.x = 0; state.y = 0; applyView(); }

function split() {
  const value = Number($("split").value);
  $("after-clip").style.clipPath = `inset(0 0 0 ${value}%)`;
  $("divider").style.left = value + "%";
  $("split").setAttribute("aria-valuetext", value + " % original, " + (100 - value) + " % enhanced");
}

function wire() {
  $("file").addEventListener("change", (event) => choose(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault(); drop.classList.remove("over");
    choose(event.dataTransfer.files[0]);
  });
  $("enhance").addEventListener("click", enhance);
  $("degrade").addEventListener("click", degradeThenEnhance);
  $("reset").addEventListener("click", async () => {
    state.input = state.original;
    try { await showBefore(state.original); await enhance(); } catch (err) { showError(err.message); }
  });
  $("split").addEventListener("input", split);
  $("zoom").addEventListener("input", () => zoomTo(2 ** (Number($("zoom").value) / 100)));
  $("fit").addEventListener("click", fit);
  $("native").addEventListener("click", native);
  $("threshold").addEventListener("input", drawOverlay);
  for (const radio of document.querySelectorAll('input[name="overlay"]')) radio.addEventListener("change", drawOverlay);

  const viewport = $("viewport");
  let drag = null;
  viewport.addEventListener("pointerdown", (event) => {
    drag = { x: event.clientX - state.x, y: event.clientY - state.y };
    viewport.setPointerCapture(event.pointerId); viewport.classList.add("dragging");
  });
  viewport.addEventListener("pointermove", (event) => {
    if (!drag) return;
    state.x = event.clientX - drag.x; state.y = event.clientY - drag.y; applyView();
  });
  viewport.addEventListener("pointerup", () => { drag = null; viewport.classList.remove("dragging"); });
  viewport.addEventListener("wheel", (event) => {
    event.preventDefault();
    const box = viewport.getBoundingClientRect();
    zoomTo(state.scale * (event.deltaY < 0 ? 1.25 : 0.8), event.clientX - box.left, event.clientY - box.top);
  }, { passive: false });
  viewport.addEventListener("keydown", (event) => {
    const step = 40;
    const moves = { ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
    if (moves[event.key]) { state.x += moves[event.key][0]; state.y += moves[event.key][1]; applyView(); }
    else if (event.key === "+" || event.key === "=") zoomTo(state.scale * 1.25);
    else if (event.key === "-") zoomTo(state.scale * 0.8);
    else if (event.key === "0") fit();
    else if (event.key === "1") native();
    else return;
    event.preventDefault();
  });
  window.addEventListener("resize", () => { if (state.natural.w) fit(); });
  split();
}

wire();
