// sdrt playground: a form over sdrt's jobs API (/v1/generations). The form's choices come from /v1/engine,
// progress from the job's server-sent events (polling if those fail), images from /v1/generations/{id}/images/{k}.
// Plain browser JavaScript: no framework, no build step, nothing fetched from another host.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 400;
const POLL_FAILURES = 5;  // consecutive failed polls before the page gives up on a job
const FINISHED = ["succeeded", "failed", "cancelled"];
let engine = null;  // /v1/engine
let job = null;  // {id, events, timer, failures, cancelling} while one runs
let cancelAsked = false;  // Cancel pressed before the server gave the job an id
let initImage = null;  // data URI of the uploaded image
let picks = 0;  // uploads chosen so far: a slow earlier one must not replace a later one

function errorText(body, status) {
  // sdrt's error shapes: A1111's {error, detail, errors} and OpenAI's {error: {message}}.
  if (body && typeof body.errors === "string" && body.errors) return body.errors;
  if (body && body.error && body.error.message) return body.error.message;
  if (body && typeof body.detail === "string") return body.detail;
  return `HTTP ${status}`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(errorText(body, response.status));
    error.status = response.status;
    throw error;
  }
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function say(text) {
  $("status").textContent = text;
  $("step").textContent = "";
}

function fillSelect(select, options, selected) {
  select.replaceChildren(...options.map(([value, label]) => {
    const option = new Option(label, value);
    option.selected = String(value) === String(selected);
    return option;
  }));
}

function sizes(axis) {
  const out = [];
  for (let px = axis.min; px <= axis.max; px += axis.step) out.push([px, `${px}`]);
  return out;
}

async function loadEngine() {
  for (;;) {  // the engine may still be loading: /v1/engine answers 503 until it is ready
    try { engine = await api("/v1/engine"); break; } catch (e) {
      $("model").textContent = `waiting for the engine: ${e.message}`;
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
  $("model").textContent = `${engine.model} · ${engine.family} · ${engine.backend}`;
  fillSelect($("width"), sizes(engine.width), engine.native.width);
  fillSelect($("height"), sizes(engine.height), engine.native.height);
  fillSelect($("scheduler"), engine.samplers.map((s) => [s.name, `${s.a1111} (${s.name})`]),
             engine.defaults.scheduler || engine.samplers[0].name);
  $("steps").max = engine.limits.max_steps;
  $("steps").value = engine.defaults.steps ?? 30;
  $("guidance_scale").value = engine.defaults.guidance_scale ?? 7.5;
  $("num_images").max = engine.limits.max_images;
  $("img2img").hidden = !engine.img2img;
  $("generate").disabled = false;
}

function number(id) {  // a blank field is left to the server's default (a blank seed: random), never 0
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function request() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value || null,
    width: number("width"), height: number("height"), steps: number("steps"), scheduler: $("scheduler").value,
    guidance_scale: number("guidance_scale"), seed: number("seed"), num_images: number("num_images") ?? 1,
  };
  if (initImage) Object.assign(body, { init_image: initImage, strength: number("strength") });
  return body;
}

function running(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
  $("progress").hidden = !on;
  $("result").setAttribute("aria-busy", on ? "true" : "false");
}

function showProgress(s) {
  if (job && job.cancelling) {  // keep saying "Cancelling…" until the job ends
    $("progress").value = s.progress;
    return;
  }
  if (s.state === "queued") {
    say(`Queued${s.queue_position ? ` (${s.queue_position} ahead)` : ""}…`);
  } else if (s.state === "running") {
    if ($("status").textContent !== "Generating…") say("Generating…");
    const image = s.images_total > 1 ? ` · image ${Math.min(s.images_done + 1, s.images_total)}/${s.images_total}` : "";
    $("step").textContent = `Step ${s.step}/${s.steps}${image}`;  // not a live region: no read-out per step
  }
  $("progress").value = s.progress;
}

function stopWatching() {
  if (!job) return;
  if (job.events) job.events.close();
  clearInterval(job.timer);
}

async function finish(id, message) {
  if (!job || job.id !== id) return;  // the done event and a poll can both get here
  stopWatching();
  job = null;
  try {
    if (message) { say("The job was lost."); showError(message); return; }
    let view;
    try { view = await api(`/v1/generations/${id}?images=false`); } catch (e) {
      say("The job ended, but its result could not be read.");
      showError(e.message);
      return;
    }
    if (view.state === "succeeded") {
      say(`Done in ${(view.finished - view.started).toFixed(1)} s`);
      showImages(view);
    } else if (view.error_kind === "cancelled") {
      say(`Cancelled at step ${view.step}/${view.steps}.`);
    } else {
      say(`The job ${view.state}${view.error_kind ? ` (${view.error_kind})` : ""}.`);
      showError(view.error || "");
    }
  } finally {
    running(false);
  }
}

function showImages(view) {
  const figures = view.links.images.map((src, k) => {
    const figure = document.createElement("figure");
    const img = new Image();
    img.alt = `image ${k + 1}, seed ${view.seeds[k]}`;
    img.onload = () => img.classList.toggle("small", img.naturalWidth < 256);
    img.src = src;
    const caption = document.createElement("figcaption");
    const text = document.createElement("pre");
    text.className = "infotext";
    text.textContent = view.infotexts[k];
    const link = document.createElement("a");
    link.href = src;
    link.download = `sdrt-${view.seeds[k]}.png`;
    link.textContent = "Download PNG";
    caption.append(text, link);
    figure.append(img, caption);
    return figure;
  });
  $("images").replaceChildren(...figures);
}

function poll(id) {
  job.timer = setInterval(async () => {
    let s;
    try { s = await api(`/v1/generations/${id}?images=false`); } catch (e) {
      if (!job || job.id !== id) return;
      job.failures += 1;
      if (e.status === 404 || job.failures >= POLL_FAILURES) finish(id, e.message);
      return;
    }
    if (!job || job.id !== id) return;  // an answer for a job the page has moved on from
    job.failures = 0;
    showProgress(s);
    if (FINISHED.includes(s.state)) finish(id);
  }, POLL_MS);
}

function watch(id) {
  const events = new EventSource(`/v1/generations/${id}/events`);
  job.events = events;
  events.addEventListener("progress", (e) => { if (job && job.id === id) showProgress(JSON.parse(e.data)); });
  events.addEventListener("done", () => finish(id));
  events.onerror = () => {  // a proxy that buffers the stream, say: fall back to polling
    events.close();
    if (job && job.id === id && !job.timer) poll(id);
  };
}

async function generate(event) {
  event.preventDefault();
  if (job) return;
  showError("");
  $("images").replaceChildren();
  cancelAsked = false;
  running(true);
  say("Submitting…");
  $("progress").value = 0;
  let submitted;
  try {
    submitted = await api("/v1/generations", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request()),
    });
  } catch (e) {
    running(false);
    say("Not started.");
    showError(e.message);
    return;
  }
  job = { id: submitted.id, events: null, timer: null, failures: 0, cancelling: false };
  showProgress(submitted);
  watch(submitted.id);
  if (cancelAsked) cancel();
}

async function cancel() {
  $("cancel").disabled = true;
  say("Cancelling…");
  if (!job) { cancelAsked = true; return; }  // sent once the job has an id
  const current = job;
  current.cancelling = true;
  try { await api(`/v1/generations/${current.id}`, { method: "DELETE" }); } catch (e) {
    if (job !== current) return;
    current.cancelling = false;  // it may still be running: let Cancel be pressed again
    $("cancel").disabled = false;
    showError(e.message);
  }
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => { URL.revokeObjectURL(url); resolve(img); };
    img.onerror = () => { URL.revokeObjectURL(url); reject(new Error(`${file.name} is not an image this browser reads`)); };
    img.src = url;
  });
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function prepareImage(file) {
  // Sent as it is (the server resizes it to the chosen size, and turns it upright by its EXIF tag), unless it is
  // larger than anything the engine makes: then it is scaled down here, so a phone photo uploads quickly.
  const img = await loadImage(file);
  const most = Math.max(engine.width.max, engine.height.max);
  const scale = most / Math.max(img.naturalWidth, img.naturalHeight);
  if (scale >= 1 && file.size <= 8 * 1024 * 1024) return readFile(file);
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(img.naturalWidth * Math.min(1, scale)));
  canvas.height = Math.max(1, Math.round(img.naturalHeight * Math.min(1, scale)));
  canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);  // drawn upright (EXIF applied)
  return canvas.toDataURL("image/jpeg", 0.92);
}

async function pickImage() {
  const file = $("init_image").files[0];
  const pick = ++picks;
  showError("");
  let image = null;
  try { image = file ? await prepareImage(file) : null; } catch (e) {
    if (pick !== picks) return;
    $("init_image").value = "";
    showError(e.message);
  }
  if (pick !== picks) return;
  initImage = image;
  $("init_preview").src = initImage || "";
  $("init_preview").hidden = !initImage;
  $("clear_image").hidden = !initImage;
}

function clearImage() {
  $("init_image").value = "";
  pickImage();
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("init_image").addEventListener("change", pickImage);
  $("clear_image").addEventListener("click", clearImage);
  $("strength").addEventListener("input", () => { $("strength_value").textContent = $("strength").value; });
  loadEngine();
});
