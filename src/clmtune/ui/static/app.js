// clmtune ui: plain JavaScript, no framework, nothing from a CDN. Every call goes to the ui server of this page
// (same origin: the session cookie set by the first ?token= load authenticates it).
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const state = {info: null, watching: null, source: null, job: null, yamlEdited: false, log: [], runs: []};

async function api(path, opts = {}) {
  const init = {method: opts.method || (opts.body !== undefined ? "POST" : "GET"), headers: {}};
  if (opts.body !== undefined) {
    if (opts.raw) { init.body = opts.body; } else { init.body = JSON.stringify(opts.body); init.headers["Content-Type"] = "application/json"; }
  }
  const resp = await fetch(path, init);
  const text = await resp.text();
  let data = text;
  try { data = JSON.parse(text); } catch (e) { /* plain text */ }
  if (!resp.ok) throw new Error((data && data.error) || `${resp.status} ${text.slice(0, 200)}`);
  return data;
}

// ---------------------------------------------------------------- data
async function loadFiles(select) {
  const {files} = await api("/api/files");
  const sel = $("file-select"), evalSel = $("eval-file");
  const keep = select || sel.value;
  sel.innerHTML = '<option value="">— pick a file —</option>' + files.map((f) =>
    `<option value="${esc(f.path)}">${esc(f.path)} (${(f.bytes / 1024).toFixed(1)} KiB)</option>`).join("");
  evalSel.innerHTML = '<option value="">held-out split</option>' + files.map((f) =>
    `<option value="${esc(f.path)}">${esc(f.path)}</option>`).join("");
  if (keep) sel.value = keep;
}

async function upload(file) {
  $("upload-status").textContent = `uploading ${file.name} …`;
  try {
    let r;
    try { r = await api(`/api/upload/${encodeURIComponent(file.name)}`, {method: "PUT", body: file, raw: true}); }
    catch (e) {
      if (!/exists already/.test(e.message) || !confirm(`${file.name} exists in the workspace: replace it?`)) throw e;
      r = await api(`/api/upload/${encodeURIComponent(file.name)}?overwrite=true`, {method: "PUT", body: file, raw: true});
    }
    $("upload-status").textContent = `uploaded ${r.path} (${r.bytes} bytes)`;
    await loadFiles(r.path);
    await pickSource(r.path);
  } catch (e) { $("upload-status").innerHTML = `<span class="error">${esc(e.message)}</span>`; }
}

async function pickSource(path) {
  state.source = path;
  $("preview").innerHTML = "";
  if (!path) return;
  if (path.startsWith("builtin:")) { $("preview").innerHTML = `<p class="muted">${esc(path)} (shipped with clmtune)</p>`; return; }
  try {
    const p = await api(`/api/preview?path=${encodeURIComponent(path)}`);
    const cols = p.columns;
    $("preview").innerHTML = `<p><strong>${esc(p.path)}</strong>: ${p.rows} rows, columns ${cols.map((c) => `<code>${esc(c)}</code>`).join(", ")}</p>` +
      `<table class="head"><thead><tr>${cols.map((c) => `<th>${esc(c)}</th>`).join("")}</tr></thead><tbody>` +
      p.head.map((r) => `<tr>${cols.map((c) => `<td>${esc(String(r[c] ?? "").slice(0, 120))}</td>`).join("")}</tr>`).join("") + "</tbody></table>";
    const g = p.guess;
    if (g.text_column) $("text-column").value = g.text_column;
    if (g.label_column) $("label-column").value = g.label_column;
    if (g.text_column && !$("template").value) $("template").value = `{${g.text_column}} => `;
    state.yamlEdited = false;
  } catch (e) { $("preview").innerHTML = `<p class="error">${esc(e.message)}</p>`; }
}

// ---------------------------------------------------------------- settings
const num = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
function settings() {
  const s = {name: $("name").value.trim(), source: state.source || $("builtin-source").value.trim(), task: $("task").value,
             model: $("model").value.trim() || "auto", method: $("method").value};
  const text = (id, key) => { const v = $(id).value.trim(); if (v) s[key] = v; };
  text("text-column", "text_column"); text("label-column", "label_column");
  if ($("template").value.trim()) s.template = $("template").value;
  const labels = $("labels").value.split(/[,，]/).map((x) => x.trim()).filter(Boolean);
  if (labels.length) s.labels = labels;
  for (const [id, key] of [["max-train-rows", "max_train_rows"], ["max-eval-rows", "max_eval_rows"], ["eval-fraction", "eval_fraction"],
                           ["r", "r"], ["epochs", "epochs"], ["max-steps", "max_steps"], ["batch-size", "batch_size"],
                           ["save-steps", "save_steps"], ["eval-steps", "eval_steps"]]) {
    const v = num(id); if (v !== null) s[key] = v;
  }
  const ml = $("max-length").value.trim(); s.max_length = ml && ml !== "auto" ? Number(ml) : "auto";
  const lr = $("lr").value.trim(); s.learning_rate = lr && lr !== "auto" ? Number(lr) : "auto";
  if (s.task !== "classify") { delete s.label_column; if (s.task === "lm") delete s.template; }
  return s;
}

async function makeYaml() {
  if (state.yamlEdited && $("yaml").value.trim()) return $("yaml").value;
  if (!settings().source) throw new Error("pick or upload a data file first (1 · Data)");
  const r = await api("/api/config", {body: settings()});
  $("yaml").value = r.yaml;
  state.yamlEdited = false;
  updateDownload();
  return r.yaml;
}

function updateDownload() {
  const a = $("download-yaml");
  a.href = URL.createObjectURL(new Blob([$("yaml").value], {type: "text/yaml"}));
  a.download = `${$("name").value.trim() || "config"}.yaml`;
}

function showAutoHint() {
  if (!state.info) return;
  const m = $("method").value;
  $("auto-hint").textContent = `auto: model → builtin:gpt2-zh-small for Chinese text, else builtin:tiny-opt; learning rate → ` +
    `${state.info.learning_rates[m]} for ${m} (1e-3 for LoRA on gpt2-zh-small); max length → the 99th percentile of ` +
    `the training rows (Check data shows the choices and their reasons).`;
}

function fillForm(cfg) {
  const d = cfg.data || {}, t = cfg.train || {}, p = cfg.peft || {}, m = cfg.model || {};
  const set = (id, v) => { $(id).value = v === undefined || v === null ? "" : v; };
  if (t.output_dir) set("name", t.output_dir.split("/").filter(Boolean).pop());
  set("task", d.task || "classify"); set("text-column", d.text_column); set("label-column", d.label_column);
  set("template", d.template); set("labels", (d.labels || []).join(", ")); set("max-train-rows", d.max_train_rows);
  set("max-eval-rows", d.max_eval_rows); set("eval-fraction", d.eval_fraction); set("max-length", d.max_length || "auto");
  set("model", m.name_or_path || "auto"); set("method", p.method || "lora"); set("r", p.method === "lora" ? p.r : "");
  set("lr", t.learning_rate || "auto"); set("epochs", t.epochs); set("max-steps", t.max_steps); set("batch-size", t.batch_size);
  set("save-steps", t.save_steps); set("eval-steps", t.eval_steps);
  if (d.source) {
    if (String(d.source).startsWith("builtin:")) { $("builtin-source").value = d.source; state.source = null; $("file-select").value = ""; }
    else { state.source = d.source; $("file-select").value = d.source; }
  }
  showAutoHint();
}

function renderPrepare(rep, warnings) {
  const d = rep.data, splits = ["train", "eval", "test"].filter((s) => d[s] || (d.read || {})[s]);
  let h = `<div class="report"><h3>What <code>clmtune prepare</code> says (task ${esc(rep.task)}, model ${esc(rep.model)}, max length ${esc(rep.max_length)})</h3>`;
  h += `<table><thead><tr><th>split</th><th>read</th><th>dropped empty</th><th>dropped duplicate</th><th>rows</th><th>cut (truncated)</th><th>prompt tokens p50/p95/max</th><th>target tokens p50/p95/max</th></tr></thead><tbody>`;
  for (const s of splits) {
    const st = rep.splits[s] || null, lens = (x) => (x ? `${x.p50}/${x.p95}/${x.max}` : "–");
    h += `<tr><td>${esc(s)}</td><td>${(d.read || {})[s] ?? (s === "eval" ? esc(d.eval_from || "") : "–")}</td><td>${(d.dropped_empty || {})[s] || 0}</td><td>${(d.dropped_duplicate || {})[s] || 0}</td>` +
         `<td>${d[s] ?? "–"}</td><td>${st ? st.truncated : "–"}</td><td>${lens(st && st.prompt_tokens)}</td><td>${lens(st && st.target_tokens)}</td></tr>`;
  }
  h += "</tbody></table><ul>";
  for (const [k, c] of Object.entries(rep.auto || {})) {
    h += `<li class="auto"><code>${esc(k)}</code>: auto → <strong>${esc(c.value)}</strong> (${esc(c.why)})` +
         (c.rows_cut !== undefined ? `; ${c.rows_cut} of ${c.rows} training rows would be cut` : "") + "</li>";
  }
  if (rep.eval_prompts_truncated) {
    const e = rep.eval_prompts_truncated;
    h += `<li>evaluation would cut ${e.truncated} of ${e.rows} held-out prompts</li>`;
  }
  if (d.sampled) h += `<li>sampled (seed ${d.sampled.seed}): train ${d.sampled.train} of ${d.rows_before_sampling.train} rows, eval ${d.sampled.eval} of ${d.rows_before_sampling.eval}</li>`;
  h += `<li>pad token <code>${esc(rep.pad_token.token)}</code>, end token <code>${esc(rep.end_token.token)}</code></li></ul>`;
  const counts = d.label_counts;
  if (counts && rep.labels && rep.labels.length) {
    const ss = Object.keys(counts).filter((s) => counts[s]);
    const max = Math.max(1, ...rep.labels.map((l) => (counts.train || {})[l] || 0));
    h += `<h3>Labels (${rep.labels.length})</h3><table class="bars"><thead><tr><th>label</th>${ss.map((s) => `<th>${esc(s)}</th>`).join("")}</tr></thead><tbody>`;
    for (const l of rep.labels.slice(0, 50)) {
      h += `<tr><td>${esc(l)}</td>${ss.map((s) => `<td>${s === "train" ? `<span style="width:${Math.round(120 * ((counts.train[l] || 0) / max))}px"></span>` : ""}${(counts[s] || {})[l] || 0}</td>`).join("")}</tr>`;
    }
    h += "</tbody></table>";
  }
  if (warnings && warnings.length) h += `<h3>Warnings</h3><ul>${warnings.map((w) => `<li class="error">${esc(w)}</li>`).join("")}</ul>`;
  $("prepare-out").innerHTML = h + "</div>";
}

async function check() {
  $("settings-error").textContent = ""; $("prepare-out").innerHTML = '<p class="muted">running clmtune prepare …</p>';
  try {
    const yaml = await makeYaml();
    const r = await api("/api/prepare", {body: {yaml}});
    renderPrepare(r.report, r.warnings);
  } catch (e) { $("prepare-out").innerHTML = ""; $("settings-error").textContent = e.message; }
}

async function start() {
  $("settings-error").textContent = "";
  try {
    const yaml = await makeYaml();
    const r = await api("/api/train", {body: {yaml, name: $("name").value.trim(), overwrite: $("overwrite").checked}});
    watch(r.run);
    await refresh();
    location.hash = "#train-section";
  } catch (e) { $("settings-error").textContent = e.message; }
}

// ---------------------------------------------------------------- training: live curves
function drawChart(records) {
  const svg = $("chart"), W = 720, H = 260, L = 50, R = 50, T = 14, B = 30;
  const loss = records.filter((r) => typeof r.loss === "number").map((r) => [r.step, r.loss]);
  const evl = records.filter((r) => typeof r.eval_loss === "number").map((r) => [r.step, r.eval_loss]);
  const acc = records.filter((r) => typeof r.eval_accuracy === "number").map((r) => [r.step, r.eval_accuracy]);
  svg.dataset.points = String(loss.length); svg.dataset.evalPoints = String(evl.length + acc.length);
  const all = loss.concat(evl);
  if (!all.length) { svg.innerHTML = `<text x="${W / 2}" y="${H / 2}" text-anchor="middle" fill="#8a96a3">waiting for the first logged step…</text>`; return; }
  const xs = all.concat(acc).map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const path = (pts, f) => pts.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${f(p[1]).toFixed(1)}`).join("");
  let g = `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#9aa5b1"/><line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#9aa5b1"/>`;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    g += `<text x="${L - 6}" y="${sy(y) + 4}" text-anchor="end" font-size="11" fill="#6b7785">${y.toPrecision(3)}</text>`;
  }
  g += `<text x="${L}" y="${H - 8}" font-size="11" fill="#6b7785">step ${x0}</text><text x="${W - R}" y="${H - 8}" text-anchor="end" font-size="11" fill="#6b7785">step ${x1}</text>`;
  g += `<path d="${path(loss, sy)}" fill="none" stroke="#2b6cb0" stroke-width="2" class="loss"/>`;
  if (loss.length === 1) g += `<circle cx="${sx(loss[0][0])}" cy="${sy(loss[0][1])}" r="3" fill="#2b6cb0"/>`;
  if (evl.length) g += `<path d="${path(evl, sy)}" fill="none" stroke="#d9822b" stroke-width="2" stroke-dasharray="5 3" class="eval"/>` +
    evl.map((p) => `<circle cx="${sx(p[0])}" cy="${sy(p[1])}" r="3" fill="#d9822b"/>`).join("");
  if (acc.length) {
    const sa = (a) => T + (1 - a) * (H - T - B);
    g += `<path d="${path(acc, sa)}" fill="none" stroke="#2f9e44" stroke-width="2" class="acc"/>` +
      `<text x="${W - R + 6}" y="${T + 10}" font-size="11" fill="#2f9e44">acc 1</text><text x="${W - R + 6}" y="${H - B}" font-size="11" fill="#2f9e44">0</text>`;
  }
  svg.innerHTML = g;
  const last = loss[loss.length - 1];
  $("chart-legend").innerHTML = `<span style="color:#2b6cb0">━ training loss</span>` + (last ? ` (step ${last[0]}: ${last[1].toFixed(4)})` : "") +
    (evl.length ? ` &nbsp; <span style="color:#d9822b">╍ held-out loss</span>` : "") + (acc.length ? ` &nbsp; <span style="color:#2f9e44">━ held-out accuracy (right axis)</span>` : "");
}

function showStatus(info) {
  const b = $("status");
  b.textContent = info.status + (info.status === "queued" && info.queue_position ? ` (${info.queue_position} ahead)` : "");
  b.className = `badge status-${info.status}`;
  $("progress").textContent = info.progress ? `step ${info.progress.step} / ${info.progress.total}` :
    (info.steps ? `${info.steps} steps` + (info.final_loss != null ? `, final loss ${info.final_loss.toFixed(4)}` : "") : "");
  $("train-error").textContent = info.error || "";
  state.job = info.job;
  $("btn-stop").disabled = !["running", "queued"].includes(info.status);
  $("btn-resume").disabled = info.status !== "interrupted" || !info.checkpoints;
}

function watch(run) {
  if (state.watching) state.watching.close();
  state.log = []; drawChart([]);
  $("current-run").textContent = run; $("current-run").dataset.run = run;
  const es = new EventSource(`/api/run/events?run=${encodeURIComponent(run)}`);
  state.watching = es;
  es.addEventListener("reset", () => { state.log = []; drawChart([]); });
  es.addEventListener("log", (ev) => { state.log.push(JSON.parse(ev.data)); drawChart(state.log); });
  es.addEventListener("status", (ev) => showStatus(JSON.parse(ev.data)));
  es.addEventListener("end", () => { es.close(); state.watching = null; refresh(); });
  es.onerror = () => { /* the browser reconnects by itself */ };
}

async function stop() {
  if (!state.job) return;
  try { await api(`/api/jobs/${state.job}/stop`, {method: "POST"}); $("status").textContent = "stopping…"; }
  catch (e) { $("train-error").textContent = e.message; }
}

async function resume(run) {
  run = run || $("current-run").dataset.run;
  try { await api("/api/resume", {body: {run}}); watch(run); refresh(); }
  catch (e) { $("train-error").textContent = e.message; }
}

// ---------------------------------------------------------------- runs
function evalText(r) {
  if (!r.eval) return "";
  const e = r.eval;
  return e.accuracy !== undefined ? `acc ${(100 * e.accuracy).toFixed(1)} %` : e.perplexity !== undefined ? `ppl ${e.perplexity.toFixed(2)}` : e.method;
}

async function refresh() {
  try {
    const [{runs}, {jobs}] = await Promise.all([api("/api/runs"), api("/api/jobs")]);
    state.runs = runs;
    const checked = new Set([...document.querySelectorAll("#runs .cmp:checked")].map((c) => c.value));
    $("runs").tBodies[0].innerHTML = runs.map((r) => `<tr data-run="${esc(r.run)}" data-status="${esc(r.status)}">
      <td><input type="checkbox" class="cmp" value="${esc(r.run)}" ${checked.has(r.run) ? "checked" : ""}></td>
      <td class="name">${esc(r.run)}<div class="muted">${esc(r.model || "")} ${esc(r.method || "")} ${esc(r.task || "")}</div></td>
      <td><span class="badge status status-${esc(r.status)}">${esc(r.status)}</span>${r.error ? `<div class="error">${esc(r.error)}</div>` : ""}</td>
      <td>${r.progress ? `${r.progress.step}/${r.progress.total}` : r.steps ?? ""}</td>
      <td>${r.final_loss != null ? r.final_loss.toFixed(4) : ""}</td><td class="eval">${esc(evalText(r))}</td>
      <td class="actions"><button data-act="watch">Curves</button> <button data-act="load">Load config</button>
        ${r.status === "finished" ? '<button data-act="play">Playground</button> <button data-act="eval">Evaluate</button> <button data-act="export">Export</button> <button data-act="merge">Export merged</button>' : ""}
        ${r.status === "interrupted" && r.checkpoints ? '<button data-act="resume">Resume</button>' : ""}
        ${r.status === "running" || r.status === "queued" ? '<button data-act="stop">Stop</button>' : ""}</td></tr>`).join("") ||
      '<tr><td colspan="7" class="muted">no runs in this workspace yet</td></tr>';
    $("jobs").innerHTML = jobs.filter((j) => ["queued", "running", "stopping"].includes(j.status) || Date.now() / 1000 - j.created < 3600).slice(-8).reverse()
      .map((j) => `<li data-status="${esc(j.status)}"><span class="badge status-${esc(j.status === "stopped" ? "interrupted" : j.status)}">${esc(j.status)}</span> <code>${esc(j.command)}</code>` +
        (j.error ? ` <span class="error">${esc(j.error)}</span>` : "") + "</li>").join("");
  } catch (e) { $("runs-error").textContent = e.message; }
}

async function runAction(act, run) {
  $("runs-error").textContent = "";
  const r = state.runs.find((x) => x.run === run) || {};
  try {
    if (act === "watch") { watch(run); location.hash = "#train-section"; }
    else if (act === "load") {
      const text = await api(`/api/run/config?run=${encodeURIComponent(run)}`);
      const {config} = await api("/api/config/parse", {body: {yaml: text}});
      fillForm(config);  // the form first, then the YAML: the YAML box showing the run's text means both are loaded
      $("yaml").value = text; $("yaml-box").open = true; updateDownload();
      state.yamlEdited = true; location.hash = "#settings-section";
    } else if (act === "play") { await openPlayground(run); }
    else if (act === "eval") { await api("/api/eval", {body: {run, ...($("eval-file").value ? {data: $("eval-file").value} : {})}}); }
    else if (act === "export" || act === "merge") { const x = await api("/api/export", {body: {run, merge: act === "merge"}}); $("runs-error").innerHTML = `<span class="muted">exporting to ${esc(x.to)}</span>`; }
    else if (act === "resume") { await resume(run); }
    else if (act === "stop" && r.job) { await api(`/api/jobs/${r.job}/stop`, {method: "POST"}); }
    refresh();
  } catch (e) { $("runs-error").textContent = e.message; }
}

async function compare() {
  const runs = [...document.querySelectorAll("#runs .cmp:checked")].map((c) => c.value);
  $("runs-error").textContent = "";
  if (!runs.length) { $("runs-error").textContent = "tick one or more runs to compare"; return; }
  try {
    $("runs-error").innerHTML = '<span class="muted">writing the report (clmtune report) …</span>';
    const r = await api("/api/compare", {body: {runs}});
    const f = $("compare-frame"); f.hidden = false; f.src = r.url;
    $("runs-error").textContent = "";
  } catch (e) { $("runs-error").textContent = e.message; }
}

async function openPlayground(run) {
  $("play-info").textContent = `starting the playground of ${run} (clmtune serve) …`;
  location.hash = "#play-section";
  const h = await api("/api/playground", {body: {run}});
  $("play-info").innerHTML = `<strong>${esc(run)}</strong>: ${esc(h.task)}${h.labels ? ` (labels: ${h.labels.map(esc).join(", ")})` : ""}`;
  const f = $("play-frame"); f.hidden = false; f.dataset.run = run; f.src = `/play/?run=${encodeURIComponent(run)}&t=${Date.now()}`;
}

// ---------------------------------------------------------------- start
async function init() {
  state.info = await api("/api/info");
  $("workspace").textContent = state.info.workspace;
  $("task").innerHTML = state.info.tasks.map((t) => `<option>${t}</option>`).join("");
  $("method").innerHTML = state.info.methods.map((m) => `<option>${m}</option>`).join("");
  $("models").innerHTML = state.info.models.map((m) => `<option value="${esc(m)}">`).join("");
  showAutoHint();
  $("file-select").addEventListener("change", (e) => { $("builtin-source").value = ""; pickSource(e.target.value); });
  $("builtin-source").addEventListener("change", (e) => { state.source = null; $("file-select").value = ""; pickSource(e.target.value.trim()); });
  $("file-input").addEventListener("change", (e) => e.target.files[0] && upload(e.target.files[0]));
  $("settings").addEventListener("input", () => { state.yamlEdited = false; });
  $("method").addEventListener("change", showAutoHint);
  $("yaml").addEventListener("input", () => { state.yamlEdited = true; updateDownload(); });
  $("btn-check").addEventListener("click", check);
  $("btn-yaml").addEventListener("click", async () => {
    $("settings-error").textContent = "";
    try { state.yamlEdited = false; await makeYaml(); $("yaml-box").open = true; } catch (e) { $("settings-error").textContent = e.message; }
  });
  $("download-yaml").addEventListener("click", async (e) => { if (!$("yaml").value) { e.preventDefault(); try { await makeYaml(); } catch (err) { $("settings-error").textContent = err.message; } } });
  $("btn-start").addEventListener("click", start);
  $("btn-stop").addEventListener("click", stop);
  $("btn-resume").addEventListener("click", () => resume());
  $("btn-compare").addEventListener("click", compare);
  $("runs").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-act]");
    if (b) runAction(b.dataset.act, b.closest("tr").dataset.run);
  });
  $("btn-stop").disabled = true; $("btn-resume").disabled = true;
  drawChart([]);
  await loadFiles();
  await refresh();
  const active = state.runs.find((r) => r.status === "running" || r.status === "queued");
  if (active) watch(active.run);
  setInterval(refresh, 3000);
  document.body.dataset.ready = "true";
}
init().catch((e) => { document.body.insertAdjacentHTML("afterbegin", `<p class="error">${esc(e.message)}</p>`); });
