// advguard demo page: plain browser JavaScript, no build step, no external resources.
// The page is a client like any other: it sends X-Client-ID (a random id kept in localStorage),
// and X-Admin-Token / X-API-Key only when typed in. Evidence, the client's own flag state and
// neighbour images are shown only when the service says this caller is trusted.
"use strict";

const $ = (id) => document.getElementById(id);
const LOG_MIN = -10; // combined p-values below 1e-10 sit at the left end of the bar

function clientId() {
  let id = localStorage.getItem("advguard-demo-client-id");
  if (!id) {
    const bytes = new Uint8Array(8);
    crypto.getRandomValues(bytes);
    id = "demo-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    localStorage.setItem("advguard-demo-client-id", id);
  }
  return id;
}

function headers() {
  const h = { "X-Client-ID": clientId() };
  const token = sessionStorage.getItem("advguard-admin-token");
  const key = sessionStorage.getItem("advguard-api-key");
  if (token) h["X-Admin-Token"] = token;
  if (key) h["X-API-Key"] = key;
  return h;
}

let bundle = null;
let session = null;

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function refreshSession() {
  const response = await fetch("/v1/demo/session", { headers: headers() });
  if (!response.ok) {
    $("session").textContent = "session: " + (await errorText(response));
    session = null;
    return;
  }
  session = await response.json();
  const tokenTyped = Boolean(sessionStorage.getItem("advguard-admin-token"));
  const access = session.trusted
    ? "trusted: evidence shown"
    : tokenTyped ? "public: verdicts only (the admin token was not accepted)" : "public: verdicts only";
  $("session").textContent = `client ${session.client_id} · ${access}`;
  document.body.dataset.trusted = String(session.trusted);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status} ${body.error}: ${body.message}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadExamples() {
  const response = await fetch("/static/examples/examples.json");
  if (!response.ok) return;
  const { examples } = await response.json();
  const box = $("examples");
  for (const example of examples) {
    const kind = example.kind === "authentic" ? "authentic" : example.kind.toUpperCase();
    const button = el("button", {
      type: "button",
      class: example.kind === "authentic" ? "authentic" : "adversarial",
      "data-file": example.file,
      title: `${kind} made from ${example.source}`,
    });
    button.appendChild(el("img", { src: "/static/examples/" + example.file, alt: "" }));
    button.appendChild(el("span", {}, `${kind} · ${example.true_class}`));
    button.addEventListener("click", async () => {
      const blob = await (await fetch("/static/examples/" + example.file)).blob();
      classify(new File([blob], example.file, { type: "image/png" }));
    });
    box.appendChild(button);
  }
}

async function classify(file) {
  const preview = $("preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.onerror = () => { preview.hidden = true; };  // not an image the browser shows
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("result").className = "muted";
  $("result").textContent = "classifying…";
  $("evidence").hidden = true;
  const form = new FormData();
  form.append("file", file, file.name || "upload");
  const explain = session && session.trusted ? "?explain=true" : "";
  let response;
  try {
    response = await fetch("/classify" + explain, { method: "POST", body: form, headers: headers() });
  } catch (e) {
    $("result").className = "error";
    $("result").textContent = "request failed: " + e;
    return;
  }
  if (!response.ok) {
    $("result").className = "error";
    $("result").textContent = await errorText(response);
    await refreshFlag();
    return;
  }
  const body = await response.json();
  showVerdict(body);
  if (body.explanation) showEvidence(body.explanation, body);
  await refreshFlag();
}

function showVerdict(body) {
  const result = $("result");
  result.className = "";
  result.textContent = "";
  result.appendChild(el("span", { id: "decision", class: "decision " + body.decision }, body.decision));
  if (body.prediction) {
    const p = body.prediction;
    result.appendChild(el("span", { id: "class", class: "class" }, " " + p.class_name));
    result.appendChild(el("span", { id: "probability", class: "muted" },
      ` (probability ${(p.probability * 100).toFixed(1)}%)`));
  } else if (body.decision === "rejected") {
    result.appendChild(el("span", { class: "muted" }, " the prediction is withheld"));
  }
}

function barPosition(value, combination) {
  if (combination === "single") return Math.min(Math.max(value, 0), 1);
  const log = Math.log10(Math.max(value, 1e-300));
  return Math.min(Math.max((log - LOG_MIN) / -LOG_MIN, 0), 1);
}

function fmt(x) {
  if (x === null || x === undefined) return "–";
  return Math.abs(x) >= 0.01 || x === 0 ? x.toFixed(4) : x.toExponential(2);
}

function showEvidence(ex, body) {
  $("evidence").hidden = false;
  if (!body.prediction) {
    const withheld = $("result").querySelector(".muted");
    if (withheld) withheld.textContent = ` the prediction (${ex.predicted_class_name}) is withheld from public callers`;
  }
  const accepted = ex.score >= ex.threshold;
  $("combination").textContent = ex.combination === "single"
    ? "(the vote itself)" : `(${ex.combination} over p-values; log scale 1e-10 … 1)`;
  const fill = $("score-fill");
  fill.style.width = (barPosition(ex.score, ex.combination) * 100).toFixed(1) + "%";
  fill.style.background = accepted ? "var(--ok)" : "var(--bad)";
  $("threshold-mark").style.left = (barPosition(ex.threshold, ex.combination) * 100).toFixed(1) + "%";
  $("score-text").textContent = `score ${fmt(ex.score)} ${accepted ? "≥" : "<"} threshold ${fmt(ex.threshold)}`;
  const tbody = $("statistics").querySelector("tbody");
  tbody.textContent = "";
  for (const s of ex.statistics) {
    const row = el("tr");
    row.appendChild(el("td", {}, s.name));
    row.appendChild(el("td", { class: "num" }, fmt(s.value)));
    row.appendChild(el("td", { class: "num" }, fmt(s.p_value)));
    tbody.appendChild(row);
  }
  const total = ex.vote_histogram.reduce((a, b) => a + b, 0);
  $("k").textContent = String(total);
  $("vote-name").textContent = ex.vote_statistic ? `(${ex.vote_statistic})` : "";
  const histogram = $("histogram");
  histogram.textContent = "";
  const most = Math.max(1, ...ex.vote_histogram);
  const predicted = ex.predicted_class;
  ex.vote_histogram.forEach((count, index) => {
    const name = bundle ? bundle.class_names[index] : String(index);
    const isPredicted = predicted === index;
    const row = el("div", { class: "row" + (isPredicted ? " predicted" : "") });
    row.appendChild(el("span", {}, name));
    const bar = el("div", { class: "bar" });
    bar.style.width = ((count / most) * 100).toFixed(1) + "%";
    row.appendChild(bar);
    row.appendChild(el("span", { class: "num" }, String(count)));
    histogram.appendChild(row);
  });
  const box = $("neighbours");
  box.textContent = "";
  for (const n of ex.nearest) {
    const cell = el("div", { class: "neighbour", "data-id": String(n.id) });
    const holder = el("div", { class: "noimg" });
    cell.appendChild(holder);
    cell.appendChild(el("div", {}, `${n.class_name} #${n.id}`));
    box.appendChild(cell);
    if (ex.neighbour_images) loadNeighbour(n.id, holder);
  }
}

async function loadNeighbour(id, holder) {
  const response = await fetch(`/v1/neighbours/${id}`, { headers: headers() });
  if (!response.ok) {
    holder.title = await errorText(response);
    return;
  }
  const img = el("img", { alt: `training image ${id}`, class: "thumb" });
  img.src = URL.createObjectURL(await response.blob());
  holder.replaceWith(img);
}

async function refreshFlag() {
  const box = $("flag-state");
  if (!session || !session.trusted) {
    box.className = "muted";
    box.textContent = "Flag state is shown to trusted callers only (an attacker who sees its own flag knows when to change identity).";
    return;
  }
  const response = await fetch("/v1/client", { headers: headers() });
  if (!response.ok) {
    box.className = "error";
    box.textContent = await errorText(response);
    return;
  }
  const state = await response.json();
  box.className = "";
  box.textContent = "";
  if (!state.known) {
    box.appendChild(el("div", { id: "flag" }, "not flagged"));
    box.appendChild(el("div", { class: "muted small" }, "no classification yet"));
    return;
  }
  const s = state.stats;
  box.appendChild(el("div", { id: "flag", class: s.flagged ? "flagged" : "" },
    s.flagged ? "FLAGGED" : "not flagged"));
  const list = el("table");
  for (const [k, v] of [["requests", s.requests], ["accepted", s.accepted], ["rejected", s.rejected],
    ["mean flag value", fmt(s.mean_score)], ["EWMA flag value", fmt(s.ewma_score)]]) {
    const row = el("tr");
    row.appendChild(el("td", {}, k));
    row.appendChild(el("td", { class: "num" }, String(v)));
    list.appendChild(row);
  }
  box.appendChild(list);
}

function setUpDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    if (e.target.files.length) classify(e.target.files[0]);
    e.target.value = "";  // choosing the same file again must fire "change" again
  });
  // the input is hidden: the drop zone takes the keyboard (Enter or Space opens the chooser)
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      $("file").click();
    }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
  });
  $("admin-token").value = sessionStorage.getItem("advguard-admin-token") || "";
  $("api-key").value = sessionStorage.getItem("advguard-api-key") || "";
  $("save-credentials").addEventListener("click", async () => {
    sessionStorage.setItem("advguard-admin-token", $("admin-token").value);
    sessionStorage.setItem("advguard-api-key", $("api-key").value);
    await refreshSession();
    await refreshFlag();
  });
}

async function main() {
  setUpDrop();
  const response = await fetch("/v1/bundle");
  if (response.ok) bundle = await response.json();
  await refreshSession();
  await refreshFlag();
  await loadExamples();
  document.body.dataset.ready = "true";
}

main();
