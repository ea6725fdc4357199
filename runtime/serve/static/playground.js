// sdrt playground: a form over sdrt's jobs API (/v1/generations). The form's choices come from /v1/engine,
// progress from the job's server-sent events (polling if those fail), images from /v1/generations/{id}/images/{k}.
// Plain browser JavaScript: no framework, no build step, nothing fetched from another host.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 400;
let job = null;  // {id, events, timer} while one runs
let initImage = null;  // data URI of the uploaded image

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
  if (!response.ok) throw new Error(errorText(body, response.status));
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
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
  let engine;
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

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function request() {
  const number = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value || null,
    width: number("width"), height: number("height"), steps: number("steps"), scheduler: $("scheduler").value,
    guidance_scale: number("guidance_scale"), seed: number("seed"), num_images: number("num_images"),
  };
  if (initImage) Object.assign(body, { init_image: initImage, strength: number("strength") });
  return body;
}

function running(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
  $("progress").hidden = !on;
}

function showProgress(s) {
  if (s.state === "queued") {
    $("status").textContent = `Queued${s.queue_position ? ` (${s.queue_position} ahead)` : ""}…`;
  } else if (s.state === "running") {
    const image = s.images_total > 1 ? ` · image ${Math.min(s.images_done + 1, s.images_total)}/${s.images_total}` : "";
    $("status").textContent = `Step ${s.step}/${s.steps}${image}`;
  }
  $("progress").value = s.progress;
}

async function finish() {
  if (!job) return;  // the done event and a poll can both get here
  const { id } = job;
  stopWatching();
  job = null;
  running(false);
  let view;
  try { view = await api(`/v1/generations/${id}?images=false`); } catch (e) { showError(e.message); return; }
  if (view.state === "succeeded") {
    $("status").textContent = `Done in ${(view.finished - view.started).toFixed(1)} s`;
    showImages(id, view);
  } else if (view.state === "cancelled") {
    $("status").textContent = `Cancelled at step ${view.step}/${view.steps}.`;
  } else {
    $("status").textContent = `The job ${view.state}.`;
    showError(view.error || "");
  }
}

function showImages(id, view) {
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

function stopWatching() {
  if (!job) return;
  if (job.events) job.events.close();
  clearInterval(job.timer);
}

function poll() {
  const { id } = job;
  job.timer = setInterval(async () => {
    if (!job || job.id !== id) return;
    try {
      const s = await api(`/v1/generations/${id}?images=false`);
      showProgress(s);
      if (["succeeded", "failed", "cancelled"].includes(s.state)) finish();
    } catch (e) { showError(e.message); }
  }, POLL_MS);
}

function watch() {
  const events = new EventSource(`/v1/generations/${job.id}/events`);
  job.events = events;
  events.addEventListener("progress", (e) => showProgress(JSON.parse(e.data)));
  events.addEventListener("done", () => finish());
  events.onerror = () => {  // a proxy that buffers the stream, say: fall back to polling
    events.close();
    if (job && job.events === events && !job.timer) poll();
  };
}

async function generate(event) {
  event.preventDefault();
  showError("");
  $("images").replaceChildren();
  running(true);
  $("status").textContent = "Submitting…";
  $("progress").value = 0;
  try {
    const submitted = await api("/v1/generations", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request()),
    });
    job = { id: submitted.id, events: null, timer: null };
    showProgress(submitted);
    watch();
  } catch (e) {
    running(false);
    $("status").textContent = "Not started.";
    showError(e.message);
  }
}

async function cancel() {
  if (!job) return;
  $("cancel").disabled = true;
  $("status").textContent = "Cancelling…";
  try { await api(`/v1/generations/${job.id}`, { method: "DELETE" }); } catch (e) { showError(e.message); }
}

async function pickImage() {
  const file = $("init_image").files[0];
  initImage = file ? await readImage(file) : null;
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
