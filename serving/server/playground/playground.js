// The playground: a page over dcgan-serve's public HTTP API (/v1), nothing else, so it works
// wherever the API does (behind Envoy too). No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], card: null, walk: { frames: [], timer: null } };

// ------------------------------------------------------------------ the API

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = $("token").value.trim();
  if (token) headers.set("Authorization", `Bearer ${token}`);
  let answer;
  try {
    answer = await fetch(path, { ...options, headers });
  } catch (error) {
    throw new Error(`the server cannot be reached (${error.message})`);
  }
  const body = (answer.headers.get("Content-Type") || "").includes("json") ? await answer.json() : null;
  if (!answer.ok) throw new Error(body && body.error ? body.error : `HTTP ${answer.status}`);
  return body;
}

function query(params) {
  const kept = Object.entries(params).filter(([, value]) => value !== "" && value !== null && value !== undefined);
  return new URLSearchParams(kept).toString();
}

// the version picked, or for "latest" the model's latest ready one (0 when it has none)
function chosenVersion() {
  return Number($("version").value) || state.card.latest_version;
}

function modelPath(suffix) {
  return `/v1/models/${encodeURIComponent($("model").value)}/${suffix}`;
}

// ------------------------------------------------------------------ messages and busy buttons

function showError(error) {
  $("error").textContent = error.message || String(error);
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function busy(button, work) {
  clearError();
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    await work();
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

// [[term, value], ...] as the entries of a definition list, each <dt>/<dd> pair in a <div>
function terms(facts) {
  return facts.map(([term, value]) => {
    const entry = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    entry.append(dt, dd);
    return entry;
  });
}

function pngSource(base64) {
  return `data:image/png;base64,${base64}`;
}

// ------------------------------------------------------------------ models and their cards

async function loadModels() {
  const listed = await api("/v1/models");
  state.models = listed.models;
  $("model").replaceChildren(...listed.models.map((card) => new Option(card.name, card.name)));
  $("model").value = listed.default_model || (listed.models[0] && listed.models[0].name) || "";
  await chooseModel();
}

async function chooseModel() {
  const card = state.models.find((c) => c.name === $("model").value);
  state.card = card;
  if (!card) return;
  $("version").replaceChildren(new Option(`latest (${card.latest_version || "none"})`, "0"),
    ...card.versions.map((v) => {
      const option = new Option(`${v.version}: ${v.state.toLowerCase()}${v.encoder ? ", encoder" : ""}`, v.version);
      option.disabled = v.state !== "READY";
      return option;
    }));
  const conditional = card.num_classes > 0;
  document.querySelectorAll(".conditional").forEach((el) => { el.hidden = !conditional; });
  $("sample-label").replaceChildren(new Option("any", ""),
    ...card.class_names.map((name, index) => new Option(name, index)));
  await showCard();
}

async function showCard() {
  const card = state.card;
  const facts = [["kind", card.kind], ["latent size", card.latent_size], ["image", card.sample_shape.join(" x ")],
    ["classes", card.num_classes ? card.class_names.join(", ") : "none (unconditional)"],
    ["versions", card.versions.map((v) => `${v.version} ${v.state.toLowerCase()}`).join("; ")],
    ["policy", card.version_policy]];
  const version = chosenVersion();
  if (version) {
    const manifest = await api(modelPath(`manifest?${query({ version })}`));
    for (const [name, value] of Object.entries(manifest.metrics || {})) {
      if (typeof value === "number") facts.push([name, Number.isInteger(value) ? value : value.toFixed(3)]);
    }
    if (manifest.anomaly && manifest.anomaly.class_accuracy !== undefined) {
      facts.push(["class read-back", manifest.anomaly.class_accuracy.toFixed(3)]);
    }
    facts.push(["created", (manifest.created || "?").replace("T", " ").slice(0, 16)]);
  }
  $("card").replaceChildren(...terms(facts));
}

// ------------------------------------------------------------------ sampling

async function sample(event) {
  event.preventDefault();
  const guide = $("sample-guide").value;
  const params = { count: $("sample-count").value, seed: $("sample-seed").value, label: $("sample-label").value,
    truncation: $("sample-truncation").value, version: $("version").value, scale: 4 };
  if (guide) params[guide] = $("sample-guide-value").value;
  await busy($("sample-go"), async () => {
    const started = performance.now();
    const result = await api(modelPath(`samples?${query(params)}`));
    renderGrid(result);
    await Promise.all([...$("grid").querySelectorAll("img")].map((img) => img.decode()));
    $("grid").dataset.renderMs = (performance.now() - started).toFixed(1);
  });
}

function renderGrid(result) {
  const drawn = result.candidates ? `, ${result.candidates} candidates drawn` : "";
  $("sample-summary").textContent = `${result.samples.length} samples of ${result.model} version ${result.version}, ` +
    `seed ${result.seed}${drawn}`;
  $("grid").replaceChildren(...result.samples.map((item) => {
    const cell = document.createElement("button");
    cell.type = "button";
    cell.className = "cell";
    cell.setAttribute("aria-pressed", "false");
    const score = item.score === undefined ? "" : `, P(real) ${item.score.toFixed(3)}`;
    cell.setAttribute("aria-label", `sample ${item.index} of seed ${result.seed}${score}`);
    const img = document.createElement("img");
    img.src = pngSource(item.png);
    img.alt = "";
    cell.append(img);
    cell.addEventListener("click", () => showDetail(cell, result, item));
    return cell;
  }));
  $("detail").hidden = true;
}

function showDetail(cell, result, item) {
  $("grid").querySelectorAll(".cell").forEach((c) => c.setAttribute("aria-pressed", String(c === cell)));
  $("detail-image").src = pngSource(item.png);
  const facts = [["seed", result.seed], ["index", item.index], ["version", result.version]];
  if (item.score !== undefined) facts.push(["P(real)", item.score.toFixed(4)]);
  if (item.label !== undefined) facts.push(["class", state.card.class_names[item.label] || item.label]);
  $("detail-facts").replaceChildren(...terms(facts));
  $("detail-download").href = pngSource(item.png);
  $("detail-download").download = `${result.model}-v${result.version}-seed${result.seed}-${item.index}.png`;
  $("detail").hidden = false;
  $("detail-close").focus();
}

// ------------------------------------------------------------------ walks

async function walk(event) {
  event.preventDefault();
  const image = $("walk-image").files[0];
  const params = { to_seed: $("walk-to").value, steps: $("walk-steps").value, version: $("version").value, scale: 4 };
  await busy($("walk-go"), async () => {
    const result = image
      ? await api(modelPath(`walk?${query(params)}`), { method: "POST", body: image })
      : await api(modelPath(`walk?${query({ ...params, from_seed: $("walk-from").value })}`));
    play(result.frames.map((frame) => frame.png));
  });
}

function play(frames) {
  state.walk.frames = frames;
  $("walk-slider").max = frames.length - 1;
  $("walk-slider").disabled = false;
  $("walk-play").disabled = false;
  showFrame(0);
  resume();
}

function showFrame(index) {
  $("walk-slider").value = index;
  $("walk-frame").src = pngSource(state.walk.frames[index]);
  $("walk-position").textContent = `${index + 1} / ${state.walk.frames.length}`;
}

function resume() {
  clearInterval(state.walk.timer);
  state.walk.timer = setInterval(() => {
    showFrame((Number($("walk-slider").value) + 1) % state.walk.frames.length);
  }, 120);
  $("walk-play").textContent = "Pause";
}

function pause() {
  clearInterval(state.walk.timer);
  state.walk.timer = null;
  $("walk-play").textContent = "Play";
}

// ------------------------------------------------------------------ scoring

async function score(files) {
  if (!files.length) return;
  const version = $("version").value;
  const chosen = state.card.versions.find((v) => v.version === chosenVersion());
  const encoder = Boolean(chosen && chosen.encoder);
  const form = new FormData();
  [...files].forEach((file, index) => form.append(`image${index}`, file, file.name));
  await busy($("score-files"), async () => {
    const scored = await api(modelPath(`score?${query({ anomaly: encoder, version })}`), { method: "POST", body: form });
    const projected = encoder
      ? await api(modelPath(`project?${query({ version, scale: 4 })}`), { method: "POST", body: form })
      : null;
    renderScores([...files], scored, projected);
  });
}

function renderScores(files, scored, projected) {
  const rows = files.map((file, i) => {
    const row = document.createElement("tr");
    const input = document.createElement("img");
    input.src = URL.createObjectURL(file);
    input.alt = file.name;
    const recon = document.createElement("img");
    if (projected) {
      recon.src = pngSource(projected.images[i].reconstruction);
      recon.alt = `reconstruction of ${file.name}`;
    }
    const label = scored.labels ? state.card.class_names[scored.labels[i]] || scored.labels[i] : "";
    const cells = [input, projected ? recon : "no encoder", scored.probabilities[i].toFixed(3),
      scored.anomaly ? scored.anomaly[i].toFixed(4) : "", scored.anomaly_percentile
        ? `${(100 * scored.anomaly_percentile[i]).toFixed(1)}%` : "", label];
    row.append(...cells.map((value) => {
      const cell = document.createElement("td");
      cell.append(value);
      return cell;
    }));
    return row;
  });
  $("scores").tBodies[0].replaceChildren(...rows);
  $("scores").hidden = false;
}

// ------------------------------------------------------------------ tabs and wiring

function selectTab(tab) {
  document.querySelectorAll("[role=tab]").forEach((t) => {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !selected;
  });
  tab.focus();
}

function wire() {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (step) selectTab(tabs[(i + step + tabs.length) % tabs.length]);
    });
  });
  $("model").addEventListener("change", () => chooseModel().catch(showError));
  $("version").addEventListener("change", () => showCard().catch(showError));
  $("sample-form").addEventListener("submit", sample);
  $("sample-random").addEventListener("click", () => {
    $("sample-seed").value = Math.floor(Math.random() * 2 ** 31);
  });
  $("detail-close").addEventListener("click", () => { $("detail").hidden = true; });
  $("walk-form").addEventListener("submit", walk);
  $("walk-play").addEventListener("click", () => (state.walk.timer ? pause() : resume()));
  $("walk-slider").addEventListener("input", () => { pause(); showFrame(Number($("walk-slider").value)); });
  $("score-files").addEventListener("change", () => score($("score-files").files));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    score(event.dataTransfer.files);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("score-files").click();
  });
  loadModels().catch(showError);
}

wire();
