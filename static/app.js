// offload's browser page: submit image and PDF jobs, follow them live over the WebSocket.
// No build step: a plain ES module.

const jobs = new Map(); // id -> { job, name, el }
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (id) => document.getElementById(id);

// ---- WebSocket with reconnect and resubscribe -------------------------------------------------

let socket = null;
let retryMs = 500;

// ---- API key (when the service runs with --api-keys) -------------------------------------------

const KEY_SLOT = "offload-api-key";
let apiKey = sessionStorage.getItem(KEY_SLOT) || "";

function authHeaders(headers = {}) {
  return apiKey ? { ...headers, authorization: `Bearer ${apiKey}` } : headers;
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message || "";
  $("conn-state").textContent = "waiting for an API key";
  $("api-key").focus();
}

/** Checks access with a cheap request, then opens the WebSocket (or asks for a key). */
async function start() {
  let response;
  try {
    response = await fetch("/jobs?limit=1", { headers: authHeaders() });
  } catch {
    setTimeout(start, 2000);
    return;
  }
  if (response.status === 401) {
    askForKey(apiKey ? "The service refused this key." : "");
    return;
  }
  $("key-form").hidden = true;
  if (!socket) connect();
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  // A browser cannot set headers on a WebSocket: the key goes in the query.
  const token = apiKey ? `?access_token=${encodeURIComponent(apiKey)}` : "";
  socket = new WebSocket(`${scheme}://${location.host}/ws${token}`);
  socket.addEventListener("open", () => {
    retryMs = 500;
    $("conn-state").textContent = "connected";
    const open = [...jobs.values()].filter((j) => !FINAL.has(j.job.status)).map((j) => j.job.id);
    if (open.length) send({ subscribe: open });
  });
  socket.addEventListener("message", (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    if (frame.type === "job") update(frame.job);
    else if (frame.type === "error") {
      // One error frame may name one id (`id`) or several (`ids`).
      for (const id of frame.ids || (frame.id ? [frame.id] : [])) if (jobs.has(id)) showJobError(id, frame.message);
    }
  });
  socket.addEventListener("close", () => {
    $("conn-state").textContent = `reconnecting in ${Math.round(retryMs / 100) / 10} s…`;
    const wait = retryMs * (0.8 + Math.random() * 0.4);
    retryMs = Math.min(retryMs * 2, 10000);
    setTimeout(connect, wait);
  });
}

function send(frame) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(frame));
}

function follow(job, name) {
  jobs.set(job.id, { job, name, el: null });
  update(job);
  send({ subscribe: [job.id] });
}

// ---- Rendering ----------------------------------------------------------------------------------

function update(job) {
  const entry = jobs.get(job.id);
  if (!entry) return;
  // Never let a late or reordered event move progress backwards.
  if (entry.el && FINAL.has(entry.job.status) && !FINAL.has(job.status)) return;
  if (entry.el && job.progress < entry.job.progress && job.status === entry.job.status) return;
  entry.job = job;
  if (!entry.el) entry.el = createJobElement(entry);
  const el = entry.el;
  const status = el.querySelector(".status");
  status.textContent = job.status;
  status.className = `status status-${job.status}`;
  const bar = el.querySelector("progress");
  bar.value = job.progress;
  bar.setAttribute("aria-valuetext", `${Math.round(job.progress * 100)} %`);
  el.querySelector(".stage").textContent = job.error ? `${job.error.code}: ${job.error.message}` : job.stage || "";
  el.querySelector(".cancel").hidden = FINAL.has(job.status);
  el.dataset.status = job.status;
  if (job.status === "succeeded" && job.result && !el.querySelector(".result")) showResult(el, job, entry.name);
  $("no-jobs").hidden = jobs.size > 0;
}

function createJobElement(entry) {
  const li = document.createElement("li");
  li.className = "job";
  li.dataset.id = entry.job.id;
  const header = document.createElement("header");
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = entry.name;
  const kind = document.createElement("span");
  kind.className = "muted";
  kind.textContent = entry.job.kind;
  header.append(name, kind);
  const status = document.createElement("span");
  status.className = "status";
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.setAttribute("aria-label", `Progress of ${entry.name}`);
  const stage = document.createElement("span");
  stage.className = "stage muted";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "cancel secondary";
  cancel.textContent = "Cancel";
  cancel.setAttribute("aria-label", `Cancel ${entry.name}`);
  cancel.addEventListener("click", () => cancelJob(entry.job.id));
  li.append(header, status, bar, stage, cancel);
  $("jobs").prepend(li);
  return li;
}

async function showResult(el, job, name) {
  const box = document.createElement("div");
  box.className = "result";
  el.append(box);
  // Links and images cannot send a key: with one, the result is fetched and shown from memory.
  let url = job.result.url;
  if (apiKey) {
    try {
      const response = await fetch(job.result.url, { headers: authHeaders() });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      url = URL.createObjectURL(await response.blob());
    } catch (err) {
      box.textContent = `The result could not be fetched: ${err.message}`;
      return;
    }
  }
  const link = document.createElement("a");
  link.href = url;
  link.textContent = `Download ${job.result.content_type.split("/")[1].toUpperCase()} (${formatBytes(job.result.bytes)})`;
  link.setAttribute("download", job.result.filename || "");
  box.append(link);
  if (job.kind === "image") {
    const img = document.createElement("img");
    img.src = url;
    img.alt = `Result for ${name}, ${job.result.width}×${job.result.height}`;
    box.prepend(img, document.createElement("br"));
  }
}

function showJobError(id, message) {
  const entry = jobs.get(id);
  if (entry && entry.el) entry.el.querySelector(".stage").textContent = message;
}

function formatBytes(n) {
  return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`;
}

// ---- Actions ------------------------------------------------------------------------------------

async function request(url, options = {}) {
  const response = await fetch(url, { ...options, headers: authHeaders(options.headers) });
  if (response.status === 401) askForKey("The service refused the key.");
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

async function cancelJob(id) {
  try {
    update(await request(`/jobs/${id}`, { method: "DELETE" }));
  } catch (err) {
    showJobError(id, err.message);
  }
}

let pickedFiles = [];

function pick(files) {
  pickedFiles = [...files];
  $("picked").textContent = pickedFiles.length ? pickedFiles.map((f) => f.name).join(", ") : "";
}

async function submitImages(event) {
  event.preventDefault();
  $("image-error").textContent = "";
  if (!pickedFiles.length) {
    $("image-error").textContent = "Choose at least one image.";
    return;
  }
  const form = new FormData();
  for (const file of pickedFiles) form.append("file", file, file.name);
  form.append("ops", $("preset").value);
  form.append("format", $("format").value);
  try {
    const body = await request("/images", { method: "POST", body: form });
    body.jobs.forEach((job, i) => follow(job, pickedFiles[i] ? pickedFiles[i].name : "image"));
  } catch (err) {
    $("image-error").textContent = err.message;
  }
}

/** CSV with quoted fields ("a, b" and "" for a quote). */
function parseCsv(text) {
  const rows = [];
  let row = [];
  let field = "";
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') {
        field += '"';
        i++;
      } else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") {
      row.push(field);
      field = "";
    } else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(field);
      field = "";
      if (row.some((v) => v !== "")) rows.push(row);
      row = [];
    } else field += c;
  }
  row.push(field);
  if (row.some((v) => v !== "")) rows.push(row);
  return rows;
}

async function submitPdf(event) {
  event.preventDefault();
  $("pdf-error").textContent = "";
  const title = $("title").value;
  const spec = { title, page_size: $("page-size").value };
  const paragraphs = $("paragraphs").value.split(/\n\s*\n/).map((p) => p.trim()).filter(Boolean);
  if (paragraphs.length) spec.paragraphs = paragraphs;
  const rows = parseCsv($("csv").value);
  if (rows.length) spec.table = { columns: rows[0], rows: rows.slice(1) };
  try {
    const job = await request("/generate-pdf", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(spec),
    });
    follow(job, `${title}.pdf`);
  } catch (err) {
    $("pdf-error").textContent = err.message;
  }
}

// ---- Wiring -------------------------------------------------------------------------------------

const drop = $("drop");
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  pick(e.dataTransfer.files);
});
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") {
    e.preventDefault();
    $("files").click();
  }
});
$("files").addEventListener("change", (e) => pick(e.target.files));
$("image-form").addEventListener("submit", submitImages);
$("pdf-form").addEventListener("submit", submitPdf);
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  sessionStorage.setItem(KEY_SLOT, apiKey);
  if (socket) socket.close(); // reopened with the new key
  start();
});
start();
