// phitune's page: every model answers the same messages at once, streamed side by side.
// Model text is only ever inserted as text (textContent / text nodes), never parsed as HTML.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const KEY = "phitune-api-key";
const SAVED = "phitune-session";

const state = {
  info: null,
  cols: [],          // {name, model, history: [{role, content, stats?}], el, turns, busy, controller}
  inFlight: 0,
};

// ------------------------------------------------------------------ small DOM helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);   // strings become text nodes
  return node;
}

function atBottom(box) {
  return box.scrollHeight - box.scrollTop - box.clientHeight < 8;
}

// Change `box`'s content; scroll along only when the reader was already at the bottom.
function keepScroll(box, change) {
  const follow = atBottom(box);
  change();
  if (follow) box.scrollTop = box.scrollHeight;
}

function setStatus(text) {
  $("#status").textContent = text;
}

// ------------------------------------------------------------------ API with the key asked once

let keyPrompt = null;

function askKey(message) {
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve) => {
      const dialog = $("#key-dialog");
      $("#key-message").textContent = message;
      $("#key-input").value = "";
      const done = (ev) => {
        ev.preventDefault();
        const key = $("#key-input").value.trim();
        if (!key) return;
        sessionStorage.setItem(KEY, key);
        $("#key-form").removeEventListener("submit", done);
        dialog.close();
        keyPrompt = null;
        resolve();
      };
      $("#key-form").addEventListener("submit", done);
      dialog.showModal();
    });
  }
  return keyPrompt;
}

async function api(path, opts = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY);
    const headers = { "Content-Type": "application/json", ...(opts.headers || {}) };
    if (key) headers.Authorization = `Bearer ${key}`;
    const res = await fetch(path, { ...opts, headers });
    if (res.status !== 401) return res;
    if (sessionStorage.getItem(KEY) !== key) continue;   // another call got the key meanwhile
    await askKey(key ? "That key was refused; enter the server's API key." : "This server needs its API key.");
  }
}

async function apiJson(path, opts) {
  const res = await api(path, opts);
  const body = await res.json().catch(() => null);
  if (!res.ok) throw new Error((body && body.error && body.error.message) || `HTTP ${res.status}`);
  return body;
}

// Stream one chat completion; onText(piece) per delta; returns {finish_reason, usage}, with lost: true when the
// stream ended without [DONE] (the server went away or the connection broke).
async function streamChat(body, signal, onText) {
  const res = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal });
  if (!res.ok) {
    const err = await res.json().catch(() => null);
    throw new Error((err && err.error && err.error.message) || `HTTP ${res.status}`);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return { ...(last || {}), lost: true };
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return last || { finish_reason: null };
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        const choice = obj.choices[0];
        if (choice.delta && choice.delta.content) onText(choice.delta.content);
        if (choice.finish_reason) last = { finish_reason: choice.finish_reason, usage: obj.usage };
      }
    }
  }
}

// ------------------------------------------------------------------ settings

function settings() {
  const greedy = $("#greedy").checked;
  const limit = state.info && state.info.max_tokens_limit;
  let maxTokens = Math.max(1, parseInt($("#max_tokens").value, 10) || 256);
  if (limit) maxTokens = Math.min(maxTokens, limit);
  return {
    greedy,
    temperature: greedy ? 0 : parseFloat($("#temperature").value),
    top_p: greedy ? 1 : parseFloat($("#top_p").value),
    max_tokens: maxTokens,
    system_prompt: $("#system_prompt").value,
  };
}

function showSettingsLine() {
  const s = settings();
  $("#settings-line").textContent = s.greedy ? `greedy, max ${s.max_tokens} tokens`
    : `temperature ${s.temperature}, top-p ${s.top_p}, max ${s.max_tokens} tokens`;
  $("#temperature").disabled = $("#top_p").disabled = s.greedy;
}

function withSystem(messages, s) {
  const plain = messages.map((m) => ({ role: m.role, content: m.content }));
  return s.system_prompt.trim() ? [{ role: "system", content: s.system_prompt }, ...plain] : plain;
}

// ------------------------------------------------------------------ columns

function fmt(x, digits = 3) {
  return typeof x === "number" ? Number(x.toPrecision(digits)).toString() : "n/a";
}

function describe(m) {
  const lines = [];
  const stops = m.template.stop_tokens.join(" ");
  if (m.kind === "base") {
    lines.push(el("div", { class: "meta", text: `base model ${m.base_model}, no adapter` }));
  } else {
    lines.push(el("div", { class: "meta", text: `LoRA rank ${m.rank ?? "?"}${m.alpha ? ` (alpha ${m.alpha})` : ""} on ${m.base_model}` }));
    if (m.steps != null) {
      const val = m.best_val_loss != null ? `, best validation loss ${fmt(m.best_val_loss)}` : "";
      lines.push(el("div", { class: "meta", text: `trained ${m.steps} steps (${fmt(m.epochs)} epochs) on ${m.train_examples ?? "?"} examples; final training loss ${fmt(m.train_loss)}${val}` }));
    }
    if (state.info && m.base_model !== state.info.base_model) {
      lines.push(el("div", { class: "warn", text: `trained on ${m.base_model}, served on ${state.info.base_model}` }));
    }
  }
  lines.push(el("div", { class: "meta", text: `template ${m.template.kind}; ends at ${stops}` }));
  return lines;
}

function buildColumns() {
  const box = $("#columns");
  box.textContent = "";
  state.cols = state.info.models.map((m) => {
    const col = { name: m.name, model: m, history: [], busy: false, controller: null, round: 0 };
    const promptBox = el("pre", { class: "prompt", hidden: "" });
    const promptMeta = el("div", { class: "meta prompt-meta", hidden: "" });
    const turns = el("div", { class: "turns" });
    const showPrompt = el("button", { type: "button", class: "show-prompt", text: "Show prompt" });
    const regen = el("button", { type: "button", class: "regen", text: "Regenerate", disabled: "" });
    col.el = el("section", { class: "column", "data-model": m.name },
      el("div", { class: "col-head" }, el("h2", { text: m.name }), ...describe(m),
        el("div", { class: "col-actions" }, showPrompt, regen)),
      promptMeta, promptBox, turns);
    Object.assign(col, { turns, promptBox, promptMeta, regen, showPrompt });
    showPrompt.addEventListener("click", () => togglePrompt(col));
    regen.addEventListener("click", () => regenerate(col));
    box.append(col.el);
    return col;
  });
  box.style.setProperty("--n", state.cols.length);
  const ref = $("#reference");
  ref.textContent = "";
  for (const c of state.cols) ref.append(el("option", { value: c.name, text: c.name }));
  ref.value = state.cols.length > 1 ? state.cols[1].name : state.cols[0].name;
}

function addTurn(col, question) {
  const text = el("div", { class: "text" });
  const stats = el("div", { class: "stats" });
  const answer = el("div", { class: "msg assistant" }, text, stats);
  keepScroll(col.turns, () => col.turns.append(el("div", { class: "turn" },
    el("div", { class: "msg user", text: question }), answer)));
  return { text, stats };
}

function showStats(box, st) {
  box.textContent = "";
  box.className = "stats";
  if (st.error) {
    box.classList.add("error");
    box.textContent = `error: ${st.error}`;
    return;
  }
  const parts = [];
  if (st.tokens != null) parts.push(`${st.tokens} tokens`);
  if (st.first_token_s != null) parts.push(`first token ${st.first_token_s.toFixed(2)} s`);
  if (st.tokens_per_s != null) parts.push(`${st.tokens_per_s.toFixed(1)} tokens/s`);
  box.append(el("span", { text: parts.join(" · ") }));
  const why = { stop: "ended: stop token", length: null, cancelled: "stopped by you" }[st.finish_reason];
  if (st.finish_reason === "lost") {
    box.append(el("span", { class: "warn", text: "connection lost: the answer ended before the server finished it" }));
  } else if (st.finish_reason === "length") {
    box.classList.add("limit");
    box.append(el("span", { class: "warn", text: `hit the token limit (${st.max_tokens}): the model did not stop by itself` }));
  } else if (why) {
    box.append(el("span", { class: "why", text: why }));
  }
  box.dataset.finish = st.finish_reason || "";
}

// Generate the answer to the last user turn of `col.history` into `view` ({text, stats}).
async function answer(col, view, s) {
  const round = col.round;   // Clear starts a new round: an answer cancelled by it is not kept
  col.busy = true;
  col.regen.disabled = true;
  col.controller = new AbortController();
  state.inFlight += 1;
  updateButtons();
  const body = { model: col.name, messages: withSystem(col.history, s), stream: true,
                 temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens };
  const t0 = performance.now();
  let first = null, raw = "";
  const st = { max_tokens: s.max_tokens, sent_at: t0, pieces: 0 };   // times: performance.now() ms
  try {
    const end = await streamChat(body, col.controller.signal, (piece) => {
      if (first === null) first = performance.now();
      raw += piece;
      st.pieces += 1;
      keepScroll(col.turns, () => { view.text.textContent = raw.replace(/^\s+/, ""); });
    });
    const t1 = performance.now();
    st.finish_reason = end.lost ? "lost" : end.finish_reason;
    st.tokens = end && end.usage ? end.usage.completion_tokens : null;
    st.first_token_s = first === null ? null : (first - t0) / 1000;
    if (first !== null && st.tokens > 1 && t1 > first) st.tokens_per_s = (st.tokens - 1) / ((t1 - first) / 1000);
  } catch (e) {
    if (e.name === "AbortError") st.finish_reason = "cancelled";
    else st.error = e.message;
  }
  st.first_at = first;
  st.done_at = performance.now();
  col.busy = false;
  col.controller = null;
  state.inFlight -= 1;
  updateButtons();
  if (col.round !== round) return;
  const content = raw.trim();
  view.text.textContent = content;
  col.history.push({ role: "assistant", content, stats: st });
  keepScroll(col.turns, () => showStats(view.stats, st));
  col.regen.disabled = false;
  save();
  if (!col.promptBox.hidden) renderPrompt(col);
}

function send(question) {
  const s = settings();
  setStatus("");
  for (const col of state.cols) {
    col.history.push({ role: "user", content: question });
    answer(col, addTurn(col, question), s);   // not awaited: every column streams at once
  }
}

function regenerate(col) {
  if (col.busy) return;
  const last = col.history[col.history.length - 1];
  if (!last || last.role !== "assistant") return;
  col.history.pop();
  const turn = col.turns.lastElementChild;
  const view = { text: $(".assistant .text", turn), stats: $(".assistant .stats", turn) };
  view.text.textContent = "";
  view.stats.textContent = "";
  answer(col, view, settings());
}

function stopAll() {
  for (const col of state.cols) if (col.controller) col.controller.abort();
}

function clearAll() {
  stopAll();
  for (const col of state.cols) {
    col.round += 1;
    col.history = [];
    col.turns.textContent = "";
    col.regen.disabled = true;
    if (!col.promptBox.hidden) renderPrompt(col);
  }
  sessionStorage.removeItem(SAVED);
}

function updateButtons() {
  $("#send").disabled = state.inFlight > 0;
  $("#stop").disabled = state.inFlight === 0;
  document.body.classList.toggle("busy", state.inFlight > 0);
}

// ------------------------------------------------------------------ the exact prompt each model receives

async function renderPrompt(col) {
  const s = settings();
  let messages = col.history.filter((m) => m.role === "user" || m.content);
  while (messages.length && messages[messages.length - 1].role === "assistant") {
    // answered: show what the model received for its last answer
    messages = messages.slice(0, -1);
  }
  if (!messages.length) messages = [{ role: "user", content: $("#input").value || "(your question)" }];
  try {
    const r = await apiJson("/phitune/render", { method: "POST",
      body: JSON.stringify({ model: col.name, messages: withSystem(messages, s) }) });
    col.promptBox.textContent = r.prompt;
    col.promptMeta.textContent = `${r.tokens} prompt tokens; generation stops at ${r.stop_tokens.join(" ")}`;
  } catch (e) {
    col.promptBox.textContent = "";
    col.promptMeta.textContent = `error: ${e.message}`;
  }
}

function togglePrompt(col) {
  const show = col.promptBox.hidden;
  col.promptBox.hidden = col.promptMeta.hidden = !show;
  col.showPrompt.textContent = show ? "Hide prompt" : "Show prompt";
  if (show) renderPrompt(col);
}

// ------------------------------------------------------------------ export: a test set phitune eval reads

function exportRecords(reference) {
  const s = settings();
  const ref = state.cols.find((c) => c.name === reference) || state.cols[0];
  const records = [];
  let skipped = 0;
  const pairs = (col) => {
    const out = [];
    col.history.forEach((m, i) => { if (m.role === "user") out.push([i, col.history[i + 1]]); });
    return out;
  };
  const refPairs = pairs(ref);
  refPairs.forEach(([i, reply], turn) => {
    if (!reply || !reply.content.trim()) { skipped += 1; return; }   // eval refuses an empty expected answer
    const answers = {}, finish = {};
    for (const col of state.cols) {
      const p = pairs(col)[turn];
      const a = p && p[1];
      answers[col.name] = a ? a.content : null;
      finish[col.name] = a && a.stats ? (a.stats.finish_reason || "error") : null;
    }
    const messages = withSystem(ref.history.slice(0, i + 2), s);
    records.push({ messages, answers, finish_reasons: finish, expected_from: ref.name,
                   settings: { temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens,
                               system_prompt: s.system_prompt || null, base_model: state.info.base_model } });
  });
  return { records, skipped };
}

function exportSession() {
  const { records, skipped } = exportRecords($("#reference").value);
  if (!records.length) { setStatus("nothing to export yet"); return; }
  const blob = new Blob([records.map((r) => JSON.stringify(r)).join("\n") + "\n"], { type: "application/jsonl" });
  const a = el("a", { href: URL.createObjectURL(blob), download: "phitune-session.jsonl" });
  document.body.append(a);
  a.click();
  a.remove();
  setStatus(`exported ${records.length} question(s)` + (skipped ? `; ${skipped} without an answer left out` : ""));
}

// ------------------------------------------------------------------ the session survives a reload

function save() {
  const data = {};
  for (const col of state.cols) data[col.name] = col.history;
  try { sessionStorage.setItem(SAVED, JSON.stringify(data)); } catch (e) { /* full: not kept */ }
}

function restore() {
  let data;
  try { data = JSON.parse(sessionStorage.getItem(SAVED) || "null"); } catch (e) { data = null; }
  if (!data) return;
  for (const col of state.cols) {
    const history = (data[col.name] || []).filter((m) => m.role === "user" || m.role === "assistant");
    for (let i = 0; i < history.length; i++) {
      if (history[i].role !== "user") continue;
      const view = addTurn(col, history[i].content);
      const reply = history[i + 1];
      if (reply && reply.role === "assistant") {
        view.text.textContent = reply.content;
        showStats(view.stats, reply.stats || {});
      }
    }
    // an unanswered last question (reload mid-answer) is dropped: every column starts from answered turns
    col.history = history.filter((m, i) => m.role === "assistant" || (history[i + 1] && history[i + 1].role === "assistant"));
    col.regen.disabled = !col.history.length;
  }
}

// ------------------------------------------------------------------ runs: curves from metrics.jsonl

const COLORS = { train: "#2563eb", val: "#dc2626", lr: "#059669", chosen: "#059669", rejected: "#dc2626",
  margin: "#7c3aed" };

function drawChart(canvas, series, yLabel) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 640, h = canvas.clientHeight || 300;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const pts = series.flatMap((s) => s.points);
  canvas.dataset.points = String(pts.length);
  series.forEach((s) => { canvas.dataset[`${s.name}Points`] = String(s.points.length); });
  const pad = { l: 62, r: 12, t: 10, b: 34 };
  g.font = "12px system-ui, sans-serif";
  g.fillStyle = "#666";
  if (!pts.length) { g.fillText("no data", w / 2 - 20, h / 2); return; }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const margin = (y1 - y0) * 0.05;
  y0 = y0 >= 0 && y0 - margin < 0 ? 0 : y0 - margin;   // a learning rate never shows below zero
  y1 += margin;
  const tick = (v) => (v === 0 ? "0" : Math.abs(v) < 0.01 ? v.toExponential(1) : fmt(v));
  const X = (x) => pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r);
  const Y = (y) => h - pad.b - (y - y0) / (y1 - y0) * (h - pad.t - pad.b);
  g.strokeStyle = "#ddd";
  g.lineWidth = 1;
  g.textAlign = "right";
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    g.beginPath(); g.moveTo(pad.l, Y(y)); g.lineTo(w - pad.r, Y(y)); g.stroke();
    g.fillText(tick(y), pad.l - 6, Y(y) + 4);
  }
  g.textAlign = "center";
  for (let i = 0; i <= 4; i++) {
    const x = x0 + (x1 - x0) * i / 4;
    g.fillText(String(Math.round(x)), X(x), h - pad.b + 16);
  }
  g.fillText("optimizer step", pad.l + (w - pad.l - pad.r) / 2, h - 4);
  g.save(); g.translate(12, pad.t + (h - pad.t - pad.b) / 2); g.rotate(-Math.PI / 2);
  g.fillText(yLabel, 0, 0); g.restore();
  for (const s of series) {
    g.strokeStyle = g.fillStyle = s.color;
    g.lineWidth = 1.6;
    g.beginPath();
    s.points.forEach(([x, y], i) => (i ? g.lineTo(X(x), Y(y)) : g.moveTo(X(x), Y(y))));
    g.stroke();
    if (s.dots) for (const [x, y] of s.points) { g.beginPath(); g.arc(X(x), Y(y), 3, 0, 2 * Math.PI); g.fill(); }
  }
}

function fillTable(table, obj) {
  table.textContent = "";
  for (const [k, v] of Object.entries(obj)) {
    const shown = v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);
    table.append(el("tr", {}, el("th", { text: k }), el("td", { text: shown })));
  }
}

async function showRun(name) {
  const run = await apiJson(`/phitune/runs/${encodeURIComponent(name)}`);
  $("#run-dir").textContent = run.dir + (run.finished ? "" : " (no final_adapter yet)");
  const rows = run.rows.filter((r) => typeof r.step === "number");
  const series = (key) => rows.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
  drawChart($("#loss-chart"), [
    { name: "train", points: series("loss"), color: COLORS.train },
    { name: "val", points: series("val_loss"), color: COLORS.val, dots: true },
  ], "loss");
  drawChart($("#lr-chart"), [{ name: "lr", points: series("lr"), color: COLORS.lr }], "learning rate");
  // preference tuning (DPO, ORPO) logs rewards of chosen and rejected, their margin and the accuracy
  const pref = rows.some((r) => typeof r.accuracy === "number" || typeof r["rewards/chosen"] === "number");
  $("#pref-charts").hidden = !pref;
  if (pref) {
    drawChart($("#reward-chart"), [
      { name: "chosen", points: series("rewards/chosen"), color: COLORS.chosen },
      { name: "rejected", points: series("rewards/rejected"), color: COLORS.rejected },
      { name: "margin", points: series("margin"), color: COLORS.margin },
      { name: "valMargin", points: series("val_margin"), color: COLORS.val, dots: true },
    ], "reward");
    drawChart($("#accuracy-chart"), [
      { name: "train", points: series("accuracy"), color: COLORS.train },
      { name: "val", points: series("val_accuracy"), color: COLORS.val, dots: true },
    ], "accuracy");
  }
  fillTable($("#run-summary"), run.summary);
  fillTable($("#run-settings"), run.settings);
  $("#runs-tab").dataset.loaded = name;
}

async function openRuns() {
  const { runs } = await apiJson("/phitune/runs");
  const sel = $("#run-select");
  const keep = sel.value;
  sel.textContent = "";
  for (const r of runs) sel.append(el("option", { value: r.name, text: r.name }));
  $("#no-runs").hidden = runs.length > 0;
  if (!runs.length) return;
  if (runs.some((r) => r.name === keep)) sel.value = keep;
  await showRun(sel.value);
}

function switchTab(name) {
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.tab === name);
  $("#compare-tab").hidden = name !== "compare";
  $("#runs-tab").hidden = name !== "runs";
  if (name === "runs") openRuns().catch((e) => setStatus(`runs: ${e.message}`));
}

// ------------------------------------------------------------------ start

async function start() {
  for (const id of ["greedy", "temperature", "top_p", "max_tokens"]) $(`#${id}`).addEventListener("input", showSettingsLine);
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => switchTab(t.dataset.tab));
  $("#run-select").addEventListener("change", (e) => showRun(e.target.value).catch((err) => setStatus(err.message)));
  const input = $("#input");
  const submit = () => {
    const q = input.value;
    if (!q.trim() || state.inFlight > 0 || !state.cols.length) return;
    input.value = "";
    send(q);
  };
  $("#ask").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
  });
  $("#stop").addEventListener("click", stopAll);
  $("#clear").addEventListener("click", clearAll);
  $("#export").addEventListener("click", exportSession);
  try {
    state.info = await apiJson("/phitune/info");
  } catch (e) {
    setStatus(`cannot reach the server: ${e.message}`);
    return;
  }
  if (state.info.max_tokens_limit) {
    const mt = $("#max_tokens");
    mt.max = state.info.max_tokens_limit;
    if (parseInt(mt.value, 10) > state.info.max_tokens_limit) mt.value = state.info.max_tokens_limit;
  }
  document.title = `phitune: ${state.info.models.map((m) => m.name).join(" vs ")}`;
  showSettingsLine();
  buildColumns();
  restore();
  document.body.dataset.ready = "1";
  input.focus();
}

window.phitune = { state, exportRecords };
start();
