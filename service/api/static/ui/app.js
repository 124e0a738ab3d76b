// The smoothcert page: plain JavaScript against the API on this origin, no framework, no build.
// Every API call carries the key from session storage as a bearer header; every refusal is shown
// as the API's own `detail`, next to the form that caused it. A saved key is first asked who it is
// (GET /v1/whoami): the page shows its account and scopes and offers only what they allow.
"use strict";

const KEY_STORE = "smoothcert.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const POLL_MS = 400;
const MAX_ROWS_SHOWN = 500;   // a dataset job can have thousands of rows; its curve summarizes them

const $ = (id) => document.getElementById(id);

const state = {
  me: null,            // GET /v1/whoami of the saved key: {account, key_id, scopes, admin}; null until known
  signIn: 0,           // bumped by every start(), so that an older key's late answers are dropped
  models: new Map(),   // id -> model record
  input: null,         // {files: [{name, blob}], label: demo label or null}
  job: null,           // the job shown in the job panel
  poll: 0,             // bumped to stop a running poll loop
  cursor: null,        // the jobs table's next page
  blobUrls: [],        // object URLs of the job's images, revoked when another job is shown
  compare: new Map(),  // job id -> its listed record, the jobs picked for the compare view
};

const TRAIN_KINDS = new Set(["train", "train_denoiser"]);
const SVG_NS = "http://www.w3.org/2000/svg";
const Z95 = 1.959963984540054;  // the standard normal's 97.5% quantile

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// The API's `detail`: a sentence, or FastAPI's list of {loc, msg} for invalid fields.
function detailText(body, status) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => {
      const where = (e.loc || []).filter((p) => p !== "body").join(".");
      return where ? `${where}: ${e.msg}` : e.msg;
    }).join("; ");
  }
  return body ? JSON.stringify(body) : `HTTP ${status}`;
}

async function api(path, { method = "GET", body, as = "json", json = false } = {}) {
  const headers = {};
  if (json) headers["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  let resp;
  try {
    resp = await fetch(path, { method, headers, body });
  } catch (err) {
    throw new ApiError(0, `the API could not be reached (${err.message})`);
  }
  if (!resp.ok) {
    let parsed = null;
    try { parsed = await resp.json(); } catch (_) { /* not JSON: the status alone */ }
    throw new ApiError(resp.status, `${resp.status}: ${detailText(parsed, resp.status)}`);
  }
  return as === "blob" ? resp.blob() : resp.json();
}

function showMessage(el, text, kind = "error") {
  el.textContent = text;
  el.dataset.kind = kind;
  el.hidden = false;
}

function hide(el) {
  el.textContent = "";
  el.hidden = true;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const fmt = (x, digits = 3) => (x === null || x === undefined ? "—" : Number(x).toFixed(digits));

function jobTime(job, name) {
  const text = job[`${name}_time`];
  if (text) return new Date(text);
  const seconds = job[`${name}_at`];
  return seconds ? new Date(seconds * 1000) : null;
}

// ---- the key ----

async function saveKey(ev) {
  ev.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  await start();
}

// Who the saved key is, then what it may see: nothing is listed or offered before the API has
// said (and a refused key leaves the page signed out, its refusal shown in words).
async function start() {
  const token = ++state.signIn;
  const status = $("key-status");
  signOut();
  if (!sessionStorage.getItem(KEY_STORE)) {
    showMessage(status, "Enter the API key to begin (smoothcert up prints it).", "info");
    return;
  }
  showMessage(status, "Checking the key…", "info");
  let me;
  try {
    me = await api("/v1/whoami");
  } catch (err) {
    if (token !== state.signIn) return;
    // A refused key is not kept: the field still shows it, to be corrected and saved again.
    if (err.status === 401) sessionStorage.removeItem(KEY_STORE);
    showMessage(status, err.message);
    return;
  }
  if (token !== state.signIn) return;
  state.me = me;
  showAccount(me);
  applyAccess();
  try {
    await loadModels();
    if (token !== state.signIn) return;
    const n = state.models.size;
    showMessage(status, `Key saved for this tab. ${n} model${n === 1 ? "" : "s"} available.`, "ok");
  } catch (err) {
    if (token === state.signIn) showMessage(status, err.message);
    return;
  }
  if (!mayHaveJobs()) return;
  loadJobs(false);
  const wanted = new URLSearchParams(location.hash.slice(1)).get("job");
  if (wanted && wanted !== state.job) openJob(wanted);
}

// Forget the previous key's account, models, jobs and open job, and lock what needs a key.
function signOut() {
  state.me = null;
  hide($("key-account"));
  state.models = new Map();
  $("model-select").replaceChildren(el("option", { value: "" }, "save a valid key to list the models"));
  modelChanged();
  state.job = null;
  state.poll++;
  state.cursor = null;
  $("jobs-table").tBodies[0].replaceChildren();
  hide($("jobs-error"));
  hide($("form-error"));
  hide($("model-message"));
  hide($("train-error"));
  state.compare = new Map();
  compareChanged();
  $("compare-view").hidden = true;
  $("job-body").hidden = true;
  $("job-empty").hidden = false;
  applyAccess();
}

function showAccount(me) {
  const box = $("key-account");
  const scopes = me.scopes.length ? me.scopes.join(", ") : "none";
  box.textContent = `account ${me.account} · scopes: ${scopes}${me.admin ? " · admin" : ""}`;
  box.title = `key ${me.key_id}`;
  Object.assign(box.dataset, { account: me.account, scopes: me.scopes.join(" "), admin: String(me.admin) });
  box.hidden = false;
}

// The API's own rule (service/api/deps.py): the admin scope allows everything.
function allows(scope) {
  return Boolean(state.me) && (state.me.admin || state.me.scopes.includes(scope));
}

const mayHaveJobs = () => allows("certify") || allows("train");

// What a key without `scopes` is told in place of a section: one line, naming the scope it needs
// ("Certifying needs a key with the certify scope; this key (account bob) has models.").
function lockNote(needs, scopes) {
  const needed = `${needs} a key with the ${scopes.join(" or the ")} scope`;
  if (!state.me) return `${needed}: enter and save one above.`;
  const has = state.me.scopes.length ? state.me.scopes.join(", ") : "no scope";
  return `${needed}; this key (account ${state.me.account}) has ${has}.`;
}

// A locked section shows its note instead of its controls, which are hidden and disabled.
function lockSection(note, locked, text, controls) {
  note.textContent = locked ? text : "";
  note.hidden = !locked;
  for (const c of controls) {
    c.hidden = locked;
    if ("disabled" in c) c.disabled = locked;
  }
}

function applyAccess() {
  const certify = allows("certify");
  const jobs = mayHaveJobs();
  const models = allows("models");
  lockSection($("certify-locked"), !certify, lockNote("Certifying needs", ["certify"]), [$("certify-fields")]);
  const jobsNote = lockNote("Jobs need", ["certify", "train"]);
  lockSection($("job-locked"), !jobs, jobsNote, [$("job-panel")]);
  lockSection($("jobs-locked"), !jobs, jobsNote, [$("jobs-filter-fields"), $("jobs-list")]);
  if (!jobs) $("jobs-more").hidden = true;
  lockSection($("models-locked"), !models, lockNote("Uploading a model needs", ["models"]), [$("model-fields")]);
  lockSection($("train-locked"), !allows("train"), lockNote("Training needs", ["train"]), [$("train-fields")]);
}

// ---- models ----

async function loadModels() {
  const token = state.signIn;
  const models = await api("/v1/models");
  if (token !== state.signIn) return;  // another key was saved meanwhile
  const select = $("model-select");
  const previous = select.value;
  state.models = new Map(models.map((m) => [m.id, m]));
  select.replaceChildren();
  if (!models.length) {
    select.append(el("option", { value: "" }, "no model yet: a key with the models scope uploads one below"));
  }
  for (const m of models) {
    const dataset = {};
    if (m.visibility) dataset.visibility = m.visibility;
    if (m.owner) dataset.owner = m.owner;
    const whose = modelWhose(m);
    select.append(el("option", { value: m.id, dataset },
      `${m.name || m.id} (${m.arch || m.format}, ${m.id})${whose ? ` · ${whose}` : ""}`));
  }
  if (state.models.has(previous)) select.value = previous;
  modelChanged();
  const classifiers = $("train-classifier");
  const chosen = classifiers.value;
  classifiers.replaceChildren(el("option", { value: "" }, "none (mse needs none)"),
    ...models.filter((m) => (m.kind || "classifier") === "classifier" && m.format === "safetensors")
      .map((m) => el("option", { value: m.id }, `${m.name || m.id} (${m.id})`)));
  if (state.models.has(chosen)) classifiers.value = chosen;
}

// "public, owner alice": the record's visibility and owner, each when the server gives it (older
// servers give neither).
function modelWhose(m) {
  const parts = [];
  if (m.visibility) parts.push(m.visibility);
  if (m.owner) parts.push(`owner ${ownerText(m.owner)}`);
  return parts.join(", ");
}

const ownerText = (owner) => (state.me && owner === state.me.account ? `${owner} (this account)` : owner);

function modelChanged() {
  const model = state.models.get($("model-select").value);
  const info = $("model-info");
  info.replaceChildren();
  if (!model) return;
  const facts = [
    ["architecture", model.arch || `${model.format} graph`],
    ["input shape", `[${model.input_shape.join(", ")}] (channels, height, width)`],
    ["classes", model.class_names ? `${model.num_classes}: ${preview(model.class_names)}` : String(model.num_classes)],
    ["training σ", model.sigma === null || model.sigma === undefined ? "not recorded" : String(model.sigma)],
  ];
  if (model.visibility) facts.push(["visibility", model.visibility]);
  if (model.owner) facts.push(["owner", ownerText(model.owner)]);
  for (const [k, v] of facts) info.append(el("dt", {}, k), el("dd", {}, v));
  if (model.sigma !== null && model.sigma !== undefined) $("sigma").value = model.sigma;
  const digits = model.input_shape.join(",") === "1,8,8";
  $("demo-block").hidden = !digits;
  if (!digits && state.input && state.input.label !== null) setInput(null);
}

function preview(names) {
  return names.length <= 12 ? names.join(", ") : `${names.slice(0, 10).join(", ")}, … ${names[names.length - 1]}`;
}

function className(model, c) {
  if (c === null || c === undefined) return "—";
  const name = model && model.class_names ? model.class_names[c] : undefined;
  return name === undefined || name === String(c) ? String(c) : `${c} (${name})`;
}

// ---- inputs ----

function setInput(input) {
  state.input = input;
  for (const b of document.querySelectorAll("#demo-digits button")) {
    b.setAttribute("aria-pressed", String(Boolean(input && input.demo === b.dataset.file)));
  }
  const summary = $("input-summary");
  if (!input) summary.textContent = "";
  else if (input.demo) summary.textContent = `Demo digit ${input.label} selected.`;
  else summary.textContent = `${input.files.length} file${input.files.length === 1 ? "" : "s"}: `
    + input.files.map((f) => f.name).join(", ");
}

async function loadDigits() {
  let manifest;
  try {
    manifest = await (await fetch("/ui/digits/digits.json")).json();
  } catch (_) {
    $("demo-block").hidden = true;
    return;
  }
  const box = $("demo-digits");
  for (const d of manifest.digits) {
    const src = `/ui/digits/${d.file}`;
    box.append(el("button", {
      type: "button", class: "digit", "data-testid": `demo-digit-${d.label}`, "aria-pressed": "false",
      title: `demo digit, true class ${d.label}`, dataset: { file: d.file },
      onclick: async () => {
        const blob = await (await fetch(src)).blob();
        $("image-input").value = "";
        $("labels").value = String(d.label);
        setInput({ files: [{ name: d.file, blob }], label: d.label, demo: d.file });
      },
    }, el("img", { src, alt: `digit ${d.label}` }), el("span", {}, String(d.label))));
  }
}

function filesChosen() {
  const files = Array.from($("image-input").files);
  if (state.input && state.input.demo) $("labels").value = "";
  setInput(files.length ? { files: files.map((f) => ({ name: f.name, blob: f })), label: null } : null);
}

function noiseChanged() {
  $("quantize-field").hidden = $("noise").value !== "discrete";
}

function modeChanged() {
  const predict = $("mode").value === "predict";
  $("n0-field").hidden = predict;
  $("target-field").hidden = predict;
}

// ---- submitting ----

function formData() {
  const model = $("model-select").value;
  if (!sessionStorage.getItem(KEY_STORE)) throw new Error("Enter and save the API key first.");
  if (!model) throw new Error("Pick a model first; none is available yet (a key with the models scope uploads one below).");
  if (!state.input) throw new Error("Choose an image or .npy file, or pick a demo digit.");
  const mode = $("mode").value;
  const data = new FormData();
  data.append("model_id", model);
  data.append("mode", mode);
  const fields = [["sigma", "σ"], ["n", "n"], ["alpha", "α"]];
  if (mode === "certify") fields.push(["n0", "n0"]);
  for (const [name, label] of fields) {
    const value = $(name).value.trim();
    if (value === "") throw new Error(`${label} is required (and must be a number).`);
    data.append(name, value);
  }
  const target = $("target-radius").value.trim();
  if (mode === "certify" && target !== "") data.append("target_radius", target);
  if ($("noise").value === "discrete") {
    data.append("noise", "discrete");
    if ($("quantize").checked) data.append("quantize", "true");
  }
  const labels = $("labels").value.trim();
  if (labels !== "") {
    const list = labels.split(/[\s,]+/).filter(Boolean).map(Number);
    if (list.some((y) => !Number.isInteger(y) || y < 0)) {
      throw new Error("True class: give class indices (whole numbers ≥ 0), separated by commas.");
    }
    data.append("labels", JSON.stringify(list));
  }
  for (const f of state.input.files) data.append("inputs", f.blob, f.name);
  return data;
}

// Submit a job from a form: ``build()`` makes the request (an Error it throws is shown beside the
// form, as is the API's refusal), the button waits for the answer, the accepted job opens.
async function submitJob(ev, errorId, buttonId, build) {
  ev.preventDefault();
  const error = $(errorId);
  hide(error);
  let request;
  try {
    request = build();
  } catch (err) {
    showMessage(error, err.message);
    return;
  }
  const button = $(buttonId);
  button.disabled = true;
  try {
    const accepted = await api(request.path, { method: "POST", ...request.options });
    openJob(accepted.job_id);
    loadJobs(false);
  } catch (err) {
    showMessage(error, err.message);
  } finally {
    button.disabled = false;
  }
}

const submit = (ev) => submitJob(ev, "form-error", "submit",
  () => ({ path: "/v1/certify", options: { body: formData() } }));

// ---- one job ----

function openJob(id) {
  state.job = id;
  const token = ++state.poll;
  history.replaceState(null, "", `#job=${encodeURIComponent(id)}`);
  for (const url of state.blobUrls) URL.revokeObjectURL(url);
  state.blobUrls = [];
  $("job-empty").hidden = true;
  $("job-body").hidden = false;
  $("job-id").textContent = id;
  $("job-status").textContent = "…";
  $("result").hidden = true;
  $("train-view").hidden = true;
  $("runtime-note").hidden = true;
  hide($("job-error"));
  $("job").scrollIntoView({ block: "nearest" });
  pollJob(id, token);
}

async function pollJob(id, token) {
  while (token === state.poll) {
    let job;
    try {
      job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
    } catch (err) {
      if (token !== state.poll) return;
      showMessage($("job-error"), err.message);
      if (err.status >= 400 && err.status < 500) return;
      await sleep(2000);
      continue;
    }
    if (token !== state.poll) return;
    renderJob(job);
    if (TERMINAL.has(job.status)) {
      if (job.status === "succeeded") renderResult(job);
      loadJobs(false);
      return;
    }
    await sleep(POLL_MS);
  }
}

function renderJob(job) {
  const status = $("job-status");
  status.textContent = job.cancel_requested && !TERMINAL.has(job.status) ? `${job.status}, cancel requested`
    : job.status;
  status.dataset.status = job.status;
  const { done, total } = job.progress;
  const progress = $("progress");
  progress.max = Math.max(total, 1);
  progress.value = Math.min(done, progress.max);
  $("progress-text").textContent = progressText(job);
  $("cancel").disabled = TERMINAL.has(job.status) || job.cancel_requested;
  if (job.error) showMessage($("job-error"), job.error);
  // A model's first job waits while the worker times its runtimes (certify and predict only).
  $("runtime-note").hidden = TRAIN_KINDS.has(job.kind) || job.kind === "check_model" || TERMINAL.has(job.status)
    || done > 0;
  renderParams(job);
  if (TRAIN_KINDS.has(job.kind)) renderTraining(job);
  else $("train-view").hidden = true;
}

const isTargetRadius = (p) => p.target_radius !== undefined && p.target_radius !== null;

// What `progress` counts is its `unit`: epochs for training, noisy samples for certify and
// predict. A target-radius run stops each input as soon as its test decides, so its sample budget
// is a cap, not a count: it counts the inputs settled, and reports the samples it used once done.
function progressText(job) {
  const { done, total } = job.progress;
  const p = job.params || {};
  const pct = total ? Math.round((100 * done) / total) : (job.status === "succeeded" ? 100 : 0);
  if (TRAIN_KINDS.has(job.kind)) {
    return total ? `${done.toLocaleString()} of ${total.toLocaleString()} epochs (${pct}%)` : "";
  }
  if (isTargetRadius(p)) {
    const inputs = p.num_inputs;
    const rows = (job.result && job.result.results) || null;
    if (job.status === "succeeded" && rows) {
      const used = samplesUsed(job);
      return `${rows.length.toLocaleString()} of ${rows.length.toLocaleString()} inputs settled at r = `
        + `${p.target_radius}, with ${used.toLocaleString()} noisy samples (a fixed n would take `
        + `${(rows.length * (p.n0 + p.n)).toLocaleString()})`;
    }
    if (TERMINAL.has(job.status)) return `${job.status}: no input settled is reported`;
    if (job.progress.unit === "inputs") {
      return `${done.toLocaleString()} of ${total.toLocaleString()} inputs settled at r = `
        + `${p.target_radius} (${pct}%); each leaves as soon as its test decides`;
    }
    return `${inputs === undefined ? "the" : inputs.toLocaleString()} input${inputs === 1 ? "" : "s"} being `
      + `tested at r = ${p.target_radius}; each leaves as soon as its test decides`;
  }
  return total ? `${done.toLocaleString()} of ${total.toLocaleString()} noisy samples (${pct}%)` : "";
}

// A target-radius run's samples: its provenance's (or a dataset job's totals') count, else the rows'.
function samplesUsed(job) {
  const r = job.result || {};
  if (r.provenance && Number.isFinite(r.provenance.samples_used)) return r.provenance.samples_used;
  if (r.totals && Number.isFinite(r.totals.samples_used)) return r.totals.samples_used;
  return (r.results || []).reduce((s, row) => s + (row.samples_used || 0), 0);
}

function renderParams(job) {
  const p = job.params || {};
  const model = state.models.get(p.model_id);
  const facts = [["kind", job.kind]];
  if (TRAIN_KINDS.has(job.kind)) {
    facts.push(...trainingFacts(job));
    for (const name of ["created", "finished"]) {
      const when = jobTime(job, name);
      if (when) facts.push([name, when.toLocaleString()]);
    }
    $("job-params").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
    return;
  }
  if (p.model_id) facts.push(["model", model ? `${model.name || model.id} (${p.model_id})` : p.model_id]);
  if (p.dataset_id) facts.push(["inputs", `dataset ${p.dataset_id}, ${p.num_inputs} inputs`]);
  else if (p.num_inputs !== undefined) facts.push(["inputs", String(p.num_inputs)]);
  if (p.sigma !== undefined) {
    const sampling = p.mode === "predict" ? `n = ${p.n}` : `n0 = ${p.n0}, n = ${p.n}`;
    facts.push(["parameters", `σ = ${p.sigma}, ${sampling}, α = ${p.alpha}`
      + (isTargetRadius(p) ? `, target radius ${p.target_radius} (n is the cap per input)` : "")
      + (p.noise === "discrete" ? `, discrete noise on the 8-bit grid${p.quantize ? " (inputs rounded onto it)" : ""}` : "")]);
  }
  for (const name of ["created", "finished"]) {
    const when = jobTime(job, name);
    if (when) facts.push([name, when.toLocaleString()]);
  }
  const box = $("job-params");
  box.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

async function cancelJob() {
  const id = state.job;
  if (!id) return;
  $("cancel").disabled = true;
  try {
    renderJob(await api(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" }));
  } catch (err) {
    showMessage($("job-error"), err.message);
  }
}

function renderResult(job) {
  const result = $("result");
  $("summary-block").hidden = true;
  renderCertificateLinks(job);
  const rows = (job.result && job.result.results) || null;
  if (!rows || !rows.length) {
    result.hidden = true;
    return;
  }
  result.hidden = false;
  const multi = rows.length > 1;
  $("rows-block").hidden = !multi;
  if (multi) renderRowsTable(job, rows);
  showRow(job, 0);
  const curve = $("curve-block");
  curve.hidden = !job.result.certified_accuracy;
  if (job.result.certified_accuracy) loadImage($("curve"), `/v1/jobs/${job.id}/curve.svg`, "certified-accuracy curve");
  renderSummary(job);
}

function renderRowsTable(job, rows) {
  const model = state.models.get(job.params.model_id);
  const table = $("rows-table");
  const labelled = rows[0].label !== null && rows[0].label !== undefined;
  const sequential = rows[0].samples_used !== undefined;
  table.tHead.replaceChildren(el("tr", {}, ...["input", labelled ? "true class" : null, "class", "radius", "abstained",
    sequential ? "samples used" : null, sequential ? "stopped because" : null]
    .filter(Boolean).map((h) => el("th", {}, h))));
  const body = table.tBodies[0];
  body.replaceChildren();
  rows.slice(0, MAX_ROWS_SHOWN).forEach((row, i) => {
    body.append(el("tr", { class: "pick", dataset: { row: String(i) }, onclick: () => showRow(job, i) },
      el("td", {}, String(row.index)), labelled ? el("td", {}, className(model, row.label)) : null,
      el("td", {}, className(model, row.prediction)), el("td", {}, row.radius === undefined ? "—" : fmt(row.radius)),
      el("td", {}, row.abstained ? "yes" : "no"),
      sequential ? el("td", {}, Number(row.samples_used).toLocaleString()) : null,
      sequential ? el("td", {}, row.reason || "—") : null));
  });
  if (rows.length > MAX_ROWS_SHOWN) {
    body.append(el("tr", {}, el("td", { colspan: "5" }, `… and ${rows.length - MAX_ROWS_SHOWN} more rows`)));
  }
}

function showRow(job, i) {
  const rows = job.result.results;
  const row = rows[i];
  const model = state.models.get(job.params.model_id);
  const predict = job.kind === "predict" || job.params.mode === "predict";
  for (const tr of document.querySelectorAll("#rows-table tr.pick")) {
    tr.classList.toggle("selected", tr.dataset.row === String(i));
  }
  $("row-title").textContent = rows.length > 1 ? `Input ${row.index}` : "Answer";

  let cls = row.abstained ? "none: abstained" : className(model, row.prediction);
  if (row.label !== null && row.label !== undefined && !row.abstained) {
    cls += row.prediction === row.label ? " (matches the label)"
      : ` (does not match the label, ${className(model, row.label)})`;
  }
  const classEl = $("result-class");
  classEl.textContent = cls;
  classEl.dataset.value = row.prediction === null ? "" : String(row.prediction);

  const radius = $("result-radius");
  if (predict) {
    radius.textContent = "— (predict gives no radius)";
    radius.dataset.value = "";
  } else {
    radius.textContent = fmt(row.radius, 4);
    if (row.target_radius !== undefined) {
      radius.textContent += `; certified at r = ${row.target_radius}: ${row.certified_at_r ? "yes" : "no"}`;
    }
    radius.dataset.value = String(row.radius);
  }
  $("result-cap").textContent = fmt(row.radius_cap, 4);
  $("result-cap").dataset.value = row.radius_cap === undefined ? "" : String(row.radius_cap);

  const abstained = $("result-abstained");
  abstained.dataset.value = String(Boolean(row.abstained));
  abstained.textContent = row.abstained ? abstentionReason(job, row, predict) : "no";
  $("result-pa").textContent = predict ? `— (predict: p-value ${fmt(row.p_value, 4)})` : fmt(row.p_a_lower, 4);
  const sequential = row.samples_used !== undefined;
  for (const id of ["samples-dt", "result-samples", "stop-dt", "result-stop"]) $(id).hidden = !sequential;
  if (sequential) {
    $("result-samples").textContent = `${Number(row.samples_used).toLocaleString()} (of at most `
      + `${(job.params.n0 + job.params.n).toLocaleString()})`;
    $("result-samples").dataset.value = String(row.samples_used);
    $("result-stop").textContent = row.reason || "—";
  }

  renderHistogram($("vote-histogram"), row.votes, model, row.prediction, row.target_radius !== undefined);
  loadImage($("noisy-samples"), `/v1/jobs/${job.id}/samples.png?row=${row.index}`, `noisy copies of input ${row.index}`);
}

function abstentionReason(job, row, predict) {
  if (predict) {
    return `yes: p-value ${fmt(row.p_value, 4)} > α = ${job.params.alpha}: the top two classes are too close `
      + "to tell apart with these n samples";
  }
  if (row.p_b_upper !== undefined) {
    return `yes: p_A_lower = ${fmt(row.p_a_lower, 4)} ≤ p_B_upper = ${fmt(row.p_b_upper, 4)}: `
      + "the top class is not surely ahead of the runner-up";
  }
  return `yes: p_A_lower = ${fmt(row.p_a_lower, 4)} < ½: no class is surely the majority under noise `
    + "(more samples, or a smaller σ, may certify it)";
}

function renderHistogram(box, votes, model, predicted, sequential) {
  box.replaceChildren();
  if (!votes) {
    box.append(el("p", { class: "hint" }, sequential
      ? "none kept: a target-radius run tests one class as it samples, and counts no votes per class"
      : "this row has no vote counts"));
    return;
  }
  let entries = Object.entries(votes).map(([c, k]) => [Number(c), k]);
  const numClasses = model ? model.num_classes : 0;
  if (numClasses && numClasses <= 20) {
    const counts = new Map(entries);
    entries = Array.from({ length: numClasses }, (_, c) => [c, counts.get(c) || 0]);
  } else {
    entries.sort((a, b) => b[1] - a[1]);
    if (entries.length > 12) {
      const rest = entries.slice(11).reduce((s, e) => s + e[1], 0);
      entries = [...entries.slice(0, 11), [null, rest]];
    }
  }
  const max = Math.max(1, ...entries.map((e) => e[1]));
  const total = entries.reduce((s, e) => s + e[1], 0);
  for (const [c, k] of entries) {
    const bar = el("span", { class: "bar" });
    bar.style.width = `${(100 * k) / max}%`;
    box.append(el("div", { class: c !== null && c === predicted ? "bar-row predicted" : "bar-row",
                           dataset: { class: c === null ? "others" : String(c), count: String(k) } },
      el("span", { class: "bar-label" }, c === null ? "others" : className(model, c)),
      el("span", { class: "bar-track" }, bar),
      el("span", { class: "bar-count" }, `${k.toLocaleString()}${total ? ` (${((100 * k) / total).toFixed(1)}%)` : ""}`)));
  }
}

// An image the API serves behind the key: fetched with the bearer header, shown from a blob URL.
async function loadImage(box, path, alt) {
  const job = state.job;
  box.replaceChildren(el("p", { class: "hint" }, "loading…"));
  try {
    const blob = await api(path, { as: "blob" });
    if (job !== state.job) return;
    const url = URL.createObjectURL(blob);
    state.blobUrls.push(url);
    box.replaceChildren(el("img", { src: url, alt }));
  } catch (err) {
    if (job !== state.job) return;
    box.replaceChildren(el("p", { class: "hint" }, `not available: ${err.message}`));
  }
}

// ---- the job's certificate ----
// A succeeded certify or predict job has a signed certificate (GET /v1/jobs/{id}/certificate) and
// a printable report of it (GET /v1/jobs/{id}/report.html). Both are behind the key, which a plain
// link cannot send: each link is fetched with the bearer header instead. The certificate is saved
// as a file, its exact bytes (its SHA-256 is its name); the report opens in a new tab from a blob:
// URL, its links made absolute first (a blob: document has no path to resolve "/ui/..." against).

function renderCertificateLinks(job) {
  hide($("certificate-error"));
  const shown = job.status === "succeeded" && (job.kind === "certify" || job.kind === "predict");
  $("certificate-links").hidden = !shown;
  if (!shown) return;
  const id = encodeURIComponent(job.id);
  $("certificate-json").href = `/v1/jobs/${id}/certificate`;
  $("certificate-report").href = `/v1/jobs/${id}/report.html`;
}

function keepUrl(blob) {
  const url = URL.createObjectURL(blob);
  state.blobUrls.push(url);  // revoked when another job is shown
  return url;
}

// What the API serves behind the key, saved as a file of its exact bytes: fetched with the bearer
// header, then "clicked" from a blob: URL. Refusals appear in `errorBox`.
async function saveFromApi(path, filename, errorBox) {
  const id = state.job;
  hide(errorBox);
  try {
    const blob = await api(path, { as: "blob" });
    if (id !== state.job) return;
    el("a", { href: keepUrl(blob), download: filename }).click();
  } catch (err) {
    if (id === state.job) showMessage(errorBox, err.message);
  }
}

function downloadCertificate(ev) {
  ev.preventDefault();
  const id = state.job;
  saveFromApi(`/v1/jobs/${encodeURIComponent(id)}/certificate`, `certificate-${id}.json`, $("certificate-error"));
}

function withAbsoluteLinks(html) {
  const doc = new DOMParser().parseFromString(html, "text/html");
  for (const node of doc.querySelectorAll("[href], [src]")) {
    for (const name of ["href", "src"]) {
      const value = node.getAttribute(name);
      if (value && value.startsWith("/") && !value.startsWith("//")) {
        node.setAttribute(name, new URL(value, location.origin).href);
      }
    }
  }
  return `<!DOCTYPE html>\n${doc.documentElement.outerHTML}`;
}

async function openReport(ev) {
  ev.preventDefault();
  const id = state.job;
  hide($("certificate-error"));
  // Opened now, while the click still allows a new tab; filled once the report has arrived.
  const tab = window.open("", "_blank");
  if (tab) tab.opener = null;
  try {
    const blob = await api(`/v1/jobs/${encodeURIComponent(id)}/report.html`, { as: "blob" });
    const page = new Blob([withAbsoluteLinks(await blob.text())], { type: "text/html;charset=utf-8" });
    const url = keepUrl(page);
    if (tab) tab.location.href = url;
    else showMessage($("certificate-error"), "The browser refused a new tab: allow pop-ups for this page.");
  } catch (err) {
    if (tab) tab.close();
    if (id === state.job) showMessage($("certificate-error"), err.message);
  }
}


// ---- figures of a labelled certify job (dataset jobs, and the compare view) ----

const isRight = (row) => !row.abstained && row.prediction !== null && row.prediction !== undefined
  && row.prediction === row.label;

// Certified accuracy at radius r: the share of rows whose class matches the label with radius ≥ r
// (service/core/accuracy.py's definition).
function certifiedAt(rows, r) {
  if (!rows.length) return 0;
  return rows.filter((row) => isRight(row) && row.radius >= r).length / rows.length;
}

// ACR, the average certified radius: the mean over rows of the radius where the class matches the
// label, else 0. The result's own `acr` when it has one.
function acrOf(job, rows) {
  if (job.result && typeof job.result.acr === "number") return job.result.acr;
  if (!rows.length) return 0;
  return rows.reduce((sum, row) => sum + (isRight(row) ? row.radius : 0), 0) / rows.length;
}

// The 95% Wilson score interval of k successes in n trials: [low, high].
function wilson(k, n) {
  if (!n) return [0, 1];
  const p = k / n;
  const z2 = Z95 * Z95;
  const centre = (p + z2 / (2 * n)) / (1 + z2 / n);
  const half = (Z95 / (1 + z2 / n)) * Math.sqrt((p * (1 - p)) / n + z2 / (4 * n * n));
  return [Math.max(0, centre - half), Math.min(1, centre + half)];
}

const pct = (x, digits = 1) => `${(100 * x).toFixed(digits)}%`;

// The radii of the summary table: 0, 0.25, ... up to the rows' radius cap (their largest radius,
// or the target radius, for a target-radius run whose rows have no cap).
function standardRadii(rows) {
  const caps = rows.map((r) => r.radius_cap).filter((c) => Number.isFinite(c));
  let top = caps.length ? Math.max(...caps) : Math.max(0, ...rows.map((r) => r.radius || 0),
    ...rows.map((r) => r.target_radius || 0));
  top = Math.min(top, 10);
  const radii = [];
  for (let i = 0; 0.25 * i <= top + 1e-12; i++) radii.push(0.25 * i);
  return radii.length ? radii : [0];
}

function renderSummary(job) {
  const block = $("summary-block");
  const rows = (job.result && job.result.results) || [];
  const labelled = rows.length && rows[0].label !== null && rows[0].label !== undefined;
  const certify = job.kind === "certify" && (job.params || {}).mode !== "predict";
  block.hidden = !(labelled && certify && job.status === "succeeded");
  hide($("download-error"));
  if (block.hidden) return;
  const n = rows.length;
  const right = rows.filter(isRight).length;
  const abstained = rows.filter((r) => r.abstained).length;
  const [low, high] = wilson(right, n);
  const acr = acrOf(job, rows);
  const facts = [
    ["inputs", String(n), n],
    ["clean accuracy", `${pct(right / n)} (${right} of ${n}; 95% interval ${pct(low)} – ${pct(high)})`, right / n],
    ["abstentions", `${abstained} (${pct(abstained / n)})`, abstained],
    ["ACR", `${fmt(acr, 3)} (average certified radius)`, acr],
  ];
  if (isTargetRadius(job.params || {})) facts.push(["samples used", samplesUsed(job).toLocaleString(), samplesUsed(job)]);
  $("summary-facts").replaceChildren(...facts.flatMap(([k, v, value]) => [
    el("dt", {}, k), el("dd", { dataset: { fact: k.replace(/ /g, "-"), value: String(value) } }, v)]));
  const ciNote = `95% Wilson score interval: an estimate from ${n} image${n === 1 ? "" : "s"}, the uncertainty `
    + "of measuring on a sample of images (each certificate itself holds with 1 − α)";
  const body = $("summary-table").tBodies[0];
  body.replaceChildren(...standardRadii(rows).map((r) => {
    const k = rows.filter((row) => isRight(row) && row.radius >= r).length;
    const [lo, hi] = wilson(k, n);
    return el("tr", { dataset: { radius: String(r), accuracy: String(k / n), count: String(k) } },
      el("td", {}, r.toFixed(2)), el("td", {}, pct(k / n)),
      el("td", { title: ciNote }, `${pct(lo)} – ${pct(hi)}`), el("td", {}, `${k} of ${n}`));
  }));
  $("summary-note").textContent = `The interval beside each accuracy is a ${ciNote}. The clean accuracy is `
    + "the share of inputs whose smoothed class matches the label (the certified accuracy at r = 0).";
  const id = encodeURIComponent(job.id);
  $("download-tsv").href = `/v1/jobs/${id}/results.tsv`;
  $("download-json").href = `/v1/jobs/${id}`;
}

function downloadTsv(ev) {
  ev.preventDefault();
  saveFromApi(`/v1/jobs/${encodeURIComponent(state.job)}/results.tsv`, `results-${state.job}.tsv`, $("download-error"));
}

function downloadJson(ev) {
  ev.preventDefault();
  saveFromApi(`/v1/jobs/${encodeURIComponent(state.job)}`, `job-${state.job}.json`, $("download-error"));
}

// ---- SVG charts, drawn here (no library; attributes and classes only, as the policy wants) ----

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

// One chart: `series` = [{name, cls, points: [[x, y], ...], dots, step}], axes from the data unless
// `xRange`/`yRange` are given. Each series is a <polyline> (a staircase when `step`), and with `dots`
// one <circle class="point"> per point carrying data-x/data-y.
function lineChart({ title, series, xLabel, yLabel, xRange, yRange, yFormat = (v) => String(v), xWhole = false }) {
  const W = 420, H = 240, L = 52, R = 12, T = 24, B = 40;
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const ys = series.flatMap((s) => s.points.map((p) => p[1])).filter((v) => Number.isFinite(v));
  let [x0, x1] = xRange || [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = yRange || [Math.min(0, ...ys), Math.max(...ys)];
  if (!(x1 > x0)) { x0 -= 0.5; x1 += 0.5; }
  if (!(y1 > y0)) { y1 = y0 + (Math.abs(y0) || 1); }
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  chart.append(svg("title", {}, title));
  chart.append(svg("text", { x: L, y: 15, class: "chart-title" }, title));
  for (const t of niceTicks(y0, y1)) {
    chart.append(svg("line", { x1: L, x2: W - R, y1: py(t), y2: py(t), class: "grid" }),
      svg("text", { x: L - 6, y: py(t) + 4, class: "tick", "text-anchor": "end" }, yFormat(t)));
  }
  for (const t of niceTicks(x0, x1, 6).filter((v) => !xWhole || Number.isInteger(v))) {
    chart.append(svg("text", { x: px(t), y: H - B + 16, class: "tick", "text-anchor": "middle" }, String(t)));
  }
  chart.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }),
    svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }),
    svg("text", { x: (L + W - R) / 2, y: H - 6, class: "axis-label", "text-anchor": "middle" }, xLabel),
    svg("text", { x: 12, y: (T + H - B) / 2, class: "axis-label", "text-anchor": "middle",
                  transform: `rotate(-90 12 ${(T + H - B) / 2})` }, yLabel));
  series.forEach((s) => {
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    const g = svg("g", { class: `series ${s.cls}`, "data-series": s.name, "data-points": pts.length });
    let coords = pts.map(([x, y]) => [px(x), py(y)]);
    if (s.step) {
      coords = coords.flatMap((c, i) => (i === 0 ? [c] : [[c[0], coords[i - 1][1]], c]));
    }
    if (coords.length > 1) {
      g.append(svg("polyline", { points: coords.map((c) => `${c[0].toFixed(1)},${c[1].toFixed(1)}`).join(" "),
                                 class: "line", fill: "none" }));
    }
    if (s.dots) {
      for (const [x, y] of pts) {
        g.append(svg("circle", { cx: px(x).toFixed(1), cy: py(y).toFixed(1), r: 3, class: "point",
                                 "data-x": x, "data-y": y }, svg("title", {}, `${s.name}: ${x}, ${yFormat(y)}`)));
      }
    }
    chart.append(g);
  });
  return chart;
}

// ---- training jobs ----

function trainingFacts(job) {
  const p = job.params || {};
  const denoiser = job.kind === "train_denoiser";
  const facts = [["dataset", p.dataset === undefined ? "—" : String(p.dataset)]];
  if (p.name) facts.push(["name", p.name]);
  if (denoiser) {
    facts.push(["denoiser", `${p.arch}, depth ${p.depth}, width ${p.width}`], ["objective", String(p.objective)]);
    if (p.classifier) facts.push(["classifier", modelLabel(p.classifier)]);
    if (p.init) facts.push(["starts from", modelLabel(p.init)]);
    if (p.objective === "stability" && !p.init && p.mse_epochs) {
      facts.push(["stages", `MSE for ${p.mse_epochs} epoch${p.mse_epochs === 1 ? "" : "s"}, `
        + "then stability from its weights"]);
    }
  } else {
    facts.push(["architecture", String(p.arch)], ["method", String(p.method)]);
    if (p.method === "smoothed" || p.method === "smoothadv") facts.push(["m (copies per image)", String(p.m)]);
    if (p.method === "smoothadv") {
      facts.push(["attack", `ε = ${p.epsilon}, ${p.steps} PGD steps, warm-up ${p.warmup_epochs} epochs`]);
    }
  }
  const optimizer = denoiser ? "adam" : p.optimizer;
  facts.push(["training", `σ = ${p.sigma}, ${p.epochs} epoch${p.epochs === 1 ? "" : "s"}, batch ${p.batch_size}, `
    + `lr ${p.lr} (${optimizer}, `
    + "cosine schedule)"]);
  if (p.seed !== undefined) facts.push(["seed", String(p.seed)]);
  return facts;
}

function modelLabel(id) {
  const m = state.models.get(id);
  return m ? `${m.name || m.id} (${id})` : id;
}

// The history as charts (loss; accuracies, or the denoiser's test MSE), the metrics once done, and
// the trained model: a button that picks it in the certify form.
function renderTraining(job) {
  const view = $("train-view");
  view.hidden = false;
  const r = job.result || {};
  const history = Array.isArray(r.history) ? r.history : [];
  const box = $("train-chart");
  const denoiser = job.kind === "train_denoiser";
  if (!history.length) {
    box.replaceChildren(el("p", { class: "hint" }, job.status === "succeeded" ? "no history recorded"
      : "the chart grows by one point per finished epoch"));
  } else {
    // All epochs of the run: a stability denoiser's MSE stage counts too (progress and history say so).
    const epochs = (job.progress && job.progress.total) || history[history.length - 1].epochs
      || (job.params && job.params.epochs) || history.length;
    const xRange = [0, Math.max(epochs, 1)];
    const of = (key) => history.map((h) => [h.epoch, h[key] === null || h[key] === undefined ? NaN : h[key]]);
    const charts = [lineChart({ title: "training loss", xLabel: "epoch", yLabel: "loss", xRange, xWhole: true,
      series: [{ name: "loss", cls: "c0", points: of("loss"), dots: true }], yFormat: (v) => v.toPrecision(3) })];
    const acc = denoiser
      ? [{ name: "test accuracy on denoised copies", cls: "c1", points: of("test_denoised_accuracy"), dots: true }]
      : [{ name: "accuracy on noisy training copies", cls: "c1", points: of("noisy_accuracy"), dots: true },
         { name: "accuracy on noisy test images", cls: "c2", points: of("test_noisy_accuracy"), dots: true }];
    const shown = acc.filter((s) => s.points.some((p) => Number.isFinite(p[1])));
    if (shown.length) {
      charts.push(lineChart({ title: "accuracy under noise", xLabel: "epoch", yLabel: "accuracy", xRange, xWhole: true,
        yRange: [0, 1], series: shown, yFormat: (v) => pct(v, 0) }));
    }
    if (denoiser && history.some((h) => Number.isFinite(h.test_mse))) {
      charts.push(lineChart({ title: "test MSE of D(x + δ) against x", xLabel: "epoch", yLabel: "MSE", xRange, xWhole: true,
        series: [{ name: "test MSE", cls: "c3", points: of("test_mse"), dots: true }],
        yFormat: (v) => v.toPrecision(2) }));
    }
    box.replaceChildren(...charts.map((c) => el("div", { class: "chart-box" }, c)),
      el("ul", { class: "legend" }, ...[{ name: "loss", cls: "c0" }, ...shown].map((s) =>
        el("li", {}, el("span", { class: `swatch ${s.cls}` }), s.name))));
  }
  const metrics = r.metrics || null;
  const dl = $("train-metrics");
  dl.replaceChildren();
  if (metrics) {
    const percent = new Set(["train_noisy_accuracy", "test_noisy_accuracy", "test_clean_accuracy",
                             "test_denoised_accuracy"]);
    for (const [k, v] of Object.entries(metrics)) {
      if (v === null || v === undefined) continue;
      const text = percent.has(k) ? pct(v) : k === "elapsed_s" ? `${Number(v).toFixed(1)} s`
        : typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : String(v);
      dl.append(el("dt", {}, k.replace(/_/g, " ")), el("dd", { dataset: { metric: k } }, text));
    }
  }
  const link = $("trained-model");
  if (r.model_id) {
    link.hidden = false;
    const action = denoiser
      ? el("span", { class: "hint" }, "put it in front of a classifier with POST /v1/models/pipelines")
      : el("a", { href: `#model=${encodeURIComponent(r.model_id)}`, "data-testid": "use-trained-model",
                  onclick: (ev) => { ev.preventDefault(); useModel(r.model_id); } }, "certify with it");
    link.replaceChildren(`Trained ${denoiser ? "denoiser" : "model"}: `,
      el("code", { "data-testid": "trained-model-id" }, r.model_id),
      r.model_name ? ` (${r.model_name}) · ` : " · ", action);
    link.dataset.modelId = r.model_id;
  } else {
    link.hidden = true;
  }
}

// Pick `id` in the certify form (listing the models again first: a model trained just now is new).
async function useModel(id) {
  if (!state.models.has(id)) {
    try { await loadModels(); } catch (err) { showMessage($("job-error"), err.message); return; }
  }
  if (!state.models.has(id)) {
    showMessage($("job-error"), `model ${id} is not listed for this key`);
    return;
  }
  $("model-select").value = id;
  modelChanged();
  $("certify").scrollIntoView({ block: "start" });
}

function trainWhatChanged() {
  const denoiser = $("train-what").value === "denoiser";
  for (const f of document.querySelectorAll("#train .classifier-only")) f.hidden = denoiser;
  for (const f of document.querySelectorAll("#train .denoiser-only")) f.hidden = !denoiser;
  $("train-sigma").placeholder = denoiser ? "0.5" : "0.25";
  $("train-lr").placeholder = denoiser ? "service default" : "0.005";
  $("train-batch-size").placeholder = denoiser ? "service default" : "128";
}

function trainBody() {
  const denoiser = $("train-what").value === "denoiser";
  const body = {};
  const dataset = $("train-dataset").value.trim();
  if (!dataset) throw new Error("Dataset is required: \"digits\" or an uploaded dataset's id.");
  body.dataset = dataset;
  const name = $("train-name").value.trim();
  if (name) body.name = name;
  const numbers = [["sigma", "train-sigma", false], ["epochs", "train-epochs", true],
                   ["batch_size", "train-batch-size", true], ["lr", "train-lr", false], ["seed", "train-seed", true]];
  if (denoiser) {
    numbers.push(["depth", "train-depth", true], ["width", "train-width", true]);
    if ($("train-objective").value === "stability") numbers.push(["mse_epochs", "train-mse-epochs", true]);
  }
  else numbers.push(["m", "train-m", true], ["epsilon", "train-epsilon", false], ["steps", "train-steps", true]);
  for (const [field, id, integer] of numbers) {
    const text = $(id).value.trim();
    if (text === "") continue;
    const value = Number(text);
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      throw new Error(`${field}: give ${integer ? "a whole number" : "a number"}, not "${text}".`);
    }
    body[field] = value;
  }
  if (denoiser) {
    body.objective = $("train-objective").value;
    if ($("train-classifier").value) body.classifier = $("train-classifier").value;
    const init = $("train-init").value.trim();
    if (init) body.init = init;
  } else {
    body.arch = $("train-arch").value;
    body.method = $("train-method").value;
    if ($("train-optimizer").value) body.optimizer = $("train-optimizer").value;
  }
  return { path: denoiser ? "/v1/train/denoiser" : "/v1/train", body };
}

const submitTraining = (ev) => submitJob(ev, "train-error", "train-submit", () => {
  const { path, body } = trainBody();
  return { path, options: { body: JSON.stringify(body), json: true } };
});

// ---- the compare view ----

// A job whose curve can be drawn: a succeeded certify job with labels (its listed record carries
// `certified_accuracy`; the rows are fetched when it is compared).
const comparable = (job) => job.kind === "certify" && job.status === "succeeded"
  && (job.params || {}).mode !== "predict" && Boolean(job.result && job.result.certified_accuracy);

function pickForCompare(job, picked) {
  if (picked) state.compare.set(job.id, job);
  else state.compare.delete(job.id);
  compareChanged();
}

function compareChanged() {
  const k = state.compare.size;
  $("compare-button").disabled = k < 1;
  $("compare-button").textContent = k ? `Compare the ${k} picked job${k === 1 ? "" : "s"}` : "Compare the picked jobs";
}

function jobModelName(job) {
  const model = state.models.get((job.params || {}).model_id);
  return model ? model.name || model.id : (job.params || {}).model_id || "?";
}

async function compareJobs() {
  const error = $("compare-error");
  hide(error);
  const ids = Array.from(state.compare.keys());
  const token = state.signIn;
  let jobs;
  try {
    jobs = await Promise.all(ids.map((id) => api(`/v1/jobs/${encodeURIComponent(id)}`)));
  } catch (err) {
    if (token === state.signIn) showMessage(error, err.message);
    return;
  }
  if (token !== state.signIn) return;
  const view = $("compare-view");
  view.hidden = false;
  const series = jobs.map((job, i) => {
    const rows = job.result.results || [];
    const radii = Array.from(new Set(rows.filter(isRight).map((r) => r.radius))).sort((a, b) => a - b);
    const points = [[0, certifiedAt(rows, 0)]];
    for (const r of radii) points.push([r, certifiedAt(rows, r)], [r, certifiedAt(rows, r + 1e-12)]);
    return { job, rows, name: `${jobModelName(job)}, σ = ${job.params.sigma}`, cls: `c${i % 8}`, points };
  });
  const top = Math.max(0.25, ...series.flatMap((s) => s.rows.map((r) => (Number.isFinite(r.radius_cap)
    ? r.radius_cap : r.radius))));
  const chart = lineChart({
    title: "certified accuracy against radius", xLabel: "ℓ2 radius", yLabel: "certified accuracy",
    xRange: [0, top * 1.05], yRange: [0, 1], yFormat: (v) => pct(v, 0),
    series: series.map((s) => ({ ...s, points: [...s.points, [top * 1.05, s.points[s.points.length - 1][1]]] })),
  });
  $("compare-chart").replaceChildren(el("div", { class: "chart-box wide" }, chart));
  $("compare-legend").replaceChildren(...series.map((s) =>
    el("li", { dataset: { jobId: s.job.id, sigma: String(s.job.params.sigma) } },
      el("span", { class: `swatch ${s.cls}` }), s.name)));
  $("compare-table").tBodies[0].replaceChildren(...series.map((s) => {
    const n = s.rows.length;
    const cells = [
      ["sigma", String(s.job.params.sigma), s.job.params.sigma],
      ["n", Number(s.job.params.n).toLocaleString(), s.job.params.n],
      ["inputs", String(n), n],
      ["accuracy", pct(certifiedAt(s.rows, 0)), certifiedAt(s.rows, 0)],
      ["acr", fmt(acrOf(s.job, s.rows), 3), acrOf(s.job, s.rows)],
      ...[0.25, 0.5, 1.0].map((r) => [`at-${r}`, pct(certifiedAt(s.rows, r)), certifiedAt(s.rows, r)]),
    ];
    return el("tr", { dataset: { jobId: s.job.id } },
      el("td", {}, el("a", { href: `#job=${encodeURIComponent(s.job.id)}`,
                             onclick: (ev) => { ev.preventDefault(); openJob(s.job.id); } },
                   s.job.id.slice(0, 8))),
      el("td", {}, el("span", { class: `swatch ${s.cls}` }), jobModelName(s.job)),
      ...cells.map(([name, text, value]) => el("td", { dataset: { col: name, value: String(value) } }, text)));
  }));
  view.scrollIntoView({ block: "nearest" });
}

// ---- recent jobs ----

async function loadJobs(append) {
  const error = $("jobs-error");
  const query = new URLSearchParams({ limit: "20" });
  if ($("jobs-status").value) query.set("status", $("jobs-status").value);
  if ($("jobs-kind").value) query.set("kind", $("jobs-kind").value);
  if (append && state.cursor) query.set("cursor", state.cursor);
  const token = state.signIn;
  let page;
  try {
    page = await api(`/v1/jobs?${query}`);
  } catch (err) {
    if (token === state.signIn) showMessage(error, err.message);
    return;
  }
  if (token !== state.signIn) return;  // another key was saved meanwhile
  hide(error);
  const body = $("jobs-table").tBodies[0];
  if (!append) body.replaceChildren();
  for (const job of page.jobs) body.append(jobRow(job));
  if (!append && !page.jobs.length) {
    body.append(el("tr", {}, el("td", { colspan: "10", class: "hint" }, "no jobs yet")));
  }
  state.cursor = page.next_cursor;
  $("jobs-more").hidden = !page.next_cursor;
}

function jobRow(job) {
  const p = job.params || {};
  const model = state.models.get(p.model_id);
  const created = jobTime(job, "created");
  const { done, total } = job.progress;
  const training = TRAIN_KINDS.has(job.kind);
  let inputs = p.dataset_id ? `dataset ${p.dataset_id}` : (p.num_inputs === undefined ? "—" : String(p.num_inputs));
  if (training && p.dataset) inputs = `dataset ${p.dataset}`;
  let modelText = model ? model.name || model.id : p.model_id || "—";
  if (training) {
    const r = job.result || {};
    modelText = r.model_id ? r.model_name || r.model_id : (p.name ? `${p.name} (training)` : "training");
  }
  const pick = comparable(job)
    ? el("input", { type: "checkbox", "data-testid": "compare-pick", title: "compare this job's curve",
                    "aria-label": `compare job ${job.id}`,
                    onchange: (ev) => { pickForCompare(job, ev.target.checked); } })
    : null;
  if (pick) pick.checked = state.compare.has(job.id);
  return el("tr", { dataset: { jobId: job.id, status: job.status } },
    el("td", {}, pick),
    el("td", { title: created ? created.toISOString() : "" }, created ? created.toLocaleString() : "—"),
    el("td", {}, job.kind),
    el("td", {}, el("span", { class: "badge", dataset: { status: job.status } }, job.status)),
    el("td", { "data-testid": "job-model" }, modelText),
    el("td", {}, inputs),
    el("td", {}, p.sigma === undefined ? "—" : String(p.sigma)),
    el("td", {}, p.n === undefined ? "—" : Number(p.n).toLocaleString()),
    el("td", {}, total ? `${Math.round((100 * done) / total)}%` : "—"),
    el("td", {}, el("button", { type: "button", "data-testid": "open-job", onclick: () => openJob(job.id) }, "Open")));
}

// ---- model upload (the models scope) ----

async function uploadModel(ev) {
  ev.preventDefault();
  const message = $("model-message");
  const file = $("model-file").files[0];
  if (!file) {
    showMessage(message, "Choose a .safetensors or .onnx file first.");
    return;
  }
  const data = new FormData();
  data.append("file", file, file.name);
  const fields = { name: "model-name", arch: "model-arch", input_shape: "model-shape", num_classes: "model-classes",
                   class_names: "model-class-names", normalization: "model-normalization", sigma: "model-sigma" };
  for (const [name, id] of Object.entries(fields)) {
    const value = $(id).value.trim();
    if (value !== "") data.append(name, value);
  }
  const button = $("model-upload");
  button.disabled = true;
  showMessage(message, "Uploading; a worker loads the model and runs one batch before it is kept…", "info");
  try {
    const m = await api("/v1/models", { method: "POST", body: data });
    showMessage(message, `Model ${m.name || m.id} (${m.id}) is ready: input [${m.input_shape.join(", ")}], `
      + `${m.num_classes} classes.`, "ok");
    await loadModels();
  } catch (err) {
    showMessage(message, err.message);
  } finally {
    button.disabled = false;
  }
}

// ---- wiring ----

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", saveKey);
  $("model-select").addEventListener("change", modelChanged);
  $("image-input").addEventListener("change", filesChosen);
  $("mode").addEventListener("change", modeChanged);
  $("noise").addEventListener("change", noiseChanged);
  $("certify-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancelJob);
  $("certificate-json").addEventListener("click", downloadCertificate);
  $("certificate-report").addEventListener("click", openReport);
  $("download-tsv").addEventListener("click", downloadTsv);
  $("download-json").addEventListener("click", downloadJson);
  $("train-what").addEventListener("change", trainWhatChanged);
  $("train-form").addEventListener("submit", submitTraining);
  $("compare-button").addEventListener("click", compareJobs);
  $("jobs-filter").addEventListener("submit", (ev) => { ev.preventDefault(); loadJobs(false); });
  $("jobs-status").addEventListener("change", () => loadJobs(false));
  $("jobs-kind").addEventListener("change", () => loadJobs(false));
  $("jobs-more").addEventListener("click", () => loadJobs(true));
  $("model-form").addEventListener("submit", uploadModel);
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  modeChanged();
  trainWhatChanged();
  compareChanged();
  loadDigits();
  start();
});
