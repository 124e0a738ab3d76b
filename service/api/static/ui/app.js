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
};

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

async function api(path, { method = "GET", body, as = "json" } = {}) {
  const headers = {};
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

async function submit(ev) {
  ev.preventDefault();
  const error = $("form-error");
  hide(error);
  let data;
  try {
    data = formData();
  } catch (err) {
    showMessage(error, err.message);
    return;
  }
  const button = $("submit");
  button.disabled = true;
  try {
    const accepted = await api("/v1/certify", { method: "POST", body: data });
    openJob(accepted.job_id);
    loadJobs(false);
  } catch (err) {
    showMessage(error, err.message);
  } finally {
    button.disabled = false;
  }
}

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
  const pct = total ? Math.round((100 * done) / total) : (job.status === "succeeded" ? 100 : 0);
  $("progress-text").textContent = total
    ? `${done.toLocaleString()} of ${total.toLocaleString()} noisy samples (${pct}%)` : "";
  $("cancel").disabled = TERMINAL.has(job.status) || job.cancel_requested;
  if (job.error) showMessage($("job-error"), job.error);
  renderParams(job);
}

function renderParams(job) {
  const p = job.params || {};
  const model = state.models.get(p.model_id);
  const facts = [["kind", job.kind]];
  if (p.model_id) facts.push(["model", model ? `${model.name || model.id} (${p.model_id})` : p.model_id]);
  if (p.dataset_id) facts.push(["inputs", `dataset ${p.dataset_id}, ${p.num_inputs} inputs`]);
  else if (p.num_inputs !== undefined) facts.push(["inputs", String(p.num_inputs)]);
  if (p.sigma !== undefined) {
    const sampling = p.mode === "predict" ? `n = ${p.n}` : `n0 = ${p.n0}, n = ${p.n}`;
    facts.push(["parameters", `σ = ${p.sigma}, ${sampling}, α = ${p.alpha}`
      + (p.target_radius !== undefined ? `, target radius ${p.target_radius}` : "")]);
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
}

function renderRowsTable(job, rows) {
  const model = state.models.get(job.params.model_id);
  const table = $("rows-table");
  const labelled = rows[0].label !== null && rows[0].label !== undefined;
  table.tHead.replaceChildren(el("tr", {}, ...["input", labelled ? "true class" : null, "class", "radius", "abstained"]
    .filter(Boolean).map((h) => el("th", {}, h))));
  const body = table.tBodies[0];
  body.replaceChildren();
  rows.slice(0, MAX_ROWS_SHOWN).forEach((row, i) => {
    body.append(el("tr", { class: "pick", dataset: { row: String(i) }, onclick: () => showRow(job, i) },
      el("td", {}, String(row.index)), labelled ? el("td", {}, className(model, row.label)) : null,
      el("td", {}, className(model, row.prediction)), el("td", {}, row.radius === undefined ? "—" : fmt(row.radius)),
      el("td", {}, row.abstained ? "yes" : "no")));
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
    cls += row.prediction === row.label ? " (right)" : ` (wrong: the true class is ${className(model, row.label)})`;
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

async function downloadCertificate(ev) {
  ev.preventDefault();
  const id = state.job;
  hide($("certificate-error"));
  try {
    const blob = await api(`/v1/jobs/${encodeURIComponent(id)}/certificate`, { as: "blob" });
    if (id !== state.job) return;
    el("a", { href: keepUrl(blob), download: `certificate-${id}.json` }).click();
  } catch (err) {
    if (id === state.job) showMessage($("certificate-error"), err.message);
  }
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
    body.append(el("tr", {}, el("td", { colspan: "9", class: "hint" }, "no jobs yet")));
  }
  state.cursor = page.next_cursor;
  $("jobs-more").hidden = !page.next_cursor;
}

function jobRow(job) {
  const p = job.params || {};
  const model = state.models.get(p.model_id);
  const created = jobTime(job, "created");
  const { done, total } = job.progress;
  const inputs = p.dataset_id ? `dataset ${p.dataset_id}` : (p.num_inputs === undefined ? "—" : String(p.num_inputs));
  return el("tr", { dataset: { jobId: job.id, status: job.status } },
    el("td", { title: created ? created.toISOString() : "" }, created ? created.toLocaleString() : "—"),
    el("td", {}, job.kind),
    el("td", {}, el("span", { class: "badge", dataset: { status: job.status } }, job.status)),
    el("td", {}, model ? model.name || model.id : p.model_id || "—"),
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
  $("certify-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancelJob);
  $("certificate-json").addEventListener("click", downloadCertificate);
  $("certificate-report").addEventListener("click", openReport);
  $("jobs-filter").addEventListener("submit", (ev) => { ev.preventDefault(); loadJobs(false); });
  $("jobs-status").addEventListener("change", () => loadJobs(false));
  $("jobs-kind").addEventListener("change", () => loadJobs(false));
  $("jobs-more").addEventListener("click", () => loadJobs(true));
  $("model-form").addEventListener("submit", uploadModel);
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  modeChanged();
  loadDigits();
  start();
});
