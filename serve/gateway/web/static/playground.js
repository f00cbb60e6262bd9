// The cliplora playground: pick a served model (and a bank's adapter), give it one image and,
// for an open-vocabulary model, labels; show its ranked answer as bars. Plain JS, no build
// step, same-origin calls to the HTTP door only (GET /v1/models, POST /v1/classify).
//
// Hooks for tests (tests/test_playground_browser.py): #output carries data-state
// (idle | busy | done | error) and data-request (how many Classify clicks so far); each
// prediction is an li.result-row with data-label, data-score, data-logit and data-index set
// to the answer's JSON values as JavaScript prints them (shortest round trip).
"use strict";

(() => {
  const TOKEN_KEY = "cliplora-playground-token";
  const TOP_K = 5;

  const byId = (id) => document.getElementById(id);
  const el = {
    form: byId("form"), model: byId("model"), modelInfo: byId("model-info"),
    adapterField: byId("adapter-field"), adapter: byId("adapter"),
    drop: byId("drop"), file: byId("file"), preview: byId("preview"), fileName: byId("file-name"),
    labels: byId("labels"), labelsHint: byId("labels-hint"),
    tokenBox: byId("token-box"), token: byId("token"), classify: byId("classify"),
    output: byId("output"), error: byId("error"), placeholder: byId("placeholder"),
    results: byId("results"), latency: byId("latency"), version: byId("version"),
  };
  const LABELS_HINT = el.labelsHint.textContent;
  const state = { models: new Map(), file: null, previewUrl: "", request: 0 };

  // --- the access token: this tab only (sessionStorage), sent as a bearer token -------------

  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";  // storage refused (a privacy setting): the field still works for this page
    }
  }

  function storeToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // as above
    }
  }

  function authHeaders() {
    const token = el.token.value.trim();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  // --- errors: the door's {"error": {"code", "message"}}, else what the response says -------

  async function errorText(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // not JSON: a proxy's page, say
    }
    const error = body && body.error;
    if (error && typeof error.message === "string") {
      return `${error.code || `HTTP ${response.status}`}: ${error.message}`;
    }
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }

  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = !text;
  }

  // --- models ---------------------------------------------------------------------------------

  function placeholderOption(text) {
    el.model.replaceChildren(new Option(text, ""));
    el.model.disabled = true;
    state.models.clear();
    onModelChange();
  }

  function modelTitle(model) {
    const notes = [];
    if (model.kind === "bank") notes.push("bank");
    if (model.open_vocabulary) notes.push("open vocabulary");
    return notes.length ? `${model.id} (${notes.join(", ")})` : model.id;
  }

  async function loadModels() {
    const previous = el.model.value;
    let response;
    try {
      response = await fetch("/v1/models", { headers: authHeaders() });
    } catch (err) {
      placeholderOption("No models");
      showError(`Could not reach the gateway: ${err.message}`);
      return;
    }
    if (!response.ok) {
      placeholderOption("No models");
      showError(await errorText(response));
      if (response.status === 401) {
        el.tokenBox.open = true;
        el.token.focus();
      }
      return;
    }
    const models = (await response.json()).data || [];
    showError("");
    if (!models.length) {
      placeholderOption("No models are served");
      return;
    }
    state.models = new Map(models.map((m) => [m.id, m]));
    el.model.replaceChildren(...models.map((m) => new Option(modelTitle(m), m.id)));
    el.model.disabled = false;
    if (state.models.has(previous)) el.model.value = previous;
    onModelChange();
  }

  function selectedModel() {
    return state.models.get(el.model.value) || null;
  }

  function describeModel(model) {
    const parts = [`${model.num_classes} classes`];
    if (model.versions && model.versions.length) parts.push(`version ${model.versions.join(", ")}`);
    if (model.kind === "bank") parts.push(`${(model.adapters || []).length} adapters`);
    else if (model.lora_format && model.lora_format !== "none") parts.push(`${model.lora_format} adapter merged`);
    if (model.precision) parts.push(model.precision);
    if (model.base_model) parts.push(model.base_model);
    return parts.join(" · ");
  }

  function adapterTitle(adapter) {
    if (adapter.id === "base") return "base (no adapter)";
    return `${adapter.id} (${adapter.num_classes} classes, rank ${adapter.rank})`;
  }

  /** A bank's adapters, "base" first (the base answers when no adapter is asked for). */
  function bankAdapters(model) {
    const adapters = model.adapters || [];
    const base = adapters.find((a) => a.id === "base") || { id: "base" };
    return [base, ...adapters.filter((a) => a.id !== "base")];
  }

  function onModelChange() {
    const model = selectedModel();
    el.modelInfo.textContent = model ? describeModel(model) : "";

    const bank = Boolean(model && model.kind === "bank");
    const previous = el.adapter.value;
    el.adapterField.hidden = !bank;
    el.adapter.disabled = !bank;
    el.adapter.replaceChildren(...(bank ? bankAdapters(model).map((a) => new Option(adapterTitle(a), a.id)) : []));
    if (bank && [...el.adapter.options].some((o) => o.value === previous)) el.adapter.value = previous;

    const open = Boolean(model && model.open_vocabulary);
    el.labels.disabled = !open;
    el.labelsHint.textContent = open || !model
      ? LABELS_HINT
      : "This model was exported without open vocabulary: it answers with its own classes.";
  }

  // --- the image: file input, drop or paste ----------------------------------------------------

  function formatBytes(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
  }

  function setFile(file) {
    if (!file) return;
    state.file = file;
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    const name = `${file.name || "pasted image"} · ${formatBytes(file.size)}`;
    el.fileName.textContent = name;
    el.preview.onload = () => { el.preview.hidden = false; };
    el.preview.onerror = () => {
      el.preview.hidden = true;
      el.fileName.textContent = `${name} (no preview: the browser cannot show it)`;
    };
    el.preview.alt = `Preview of ${file.name || "the pasted image"}`;
    el.preview.src = state.previewUrl;
  }

  function firstImage(files) {
    const list = [...(files || [])];
    return list.find((f) => f.type.startsWith("image/")) || list[0] || null;
  }

  function wireImageInputs() {
    el.file.addEventListener("change", () => {
      setFile(firstImage(el.file.files));
      el.file.value = "";  // so choosing the same file again is seen as a change
    });
    for (const type of ["dragenter", "dragover"]) {
      el.drop.addEventListener(type, (event) => {
        event.preventDefault();
        el.drop.classList.add("over");
      });
    }
    for (const type of ["dragleave", "drop"]) {
      el.drop.addEventListener(type, () => el.drop.classList.remove("over"));
    }
    el.drop.addEventListener("drop", (event) => {
      event.preventDefault();
      setFile(firstImage(event.dataTransfer && event.dataTransfer.files));
    });
    // A file dropped beside the zone must not replace the page with the image.
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());
    document.addEventListener("paste", (event) => {
      const file = firstImage(event.clipboardData && event.clipboardData.files);
      if (file) setFile(file);
    });
  }

  function base64Of(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
      reader.onerror = () => reject(reader.error || new Error("cannot read the file"));
      reader.readAsDataURL(file);
    });
  }

  // --- classify ----------------------------------------------------------------------------------

  /** Comma or newline separated; blanks dropped. */
  function parseLabels(text) {
    return text.split(/[,\n]/).map((label) => label.trim()).filter(Boolean);
  }

  function requestBody(model, b64) {
    const body = { model: model.id, images: [{ b64 }], top_k: TOP_K };
    if (model.kind === "bank" && el.adapter.value) body.adapter = el.adapter.value;
    const labels = model.open_vocabulary ? parseLabels(el.labels.value) : [];
    if (labels.length) body.labels = labels;
    return body;
  }

  function renderPredictions(predictions) {
    el.results.replaceChildren(...predictions.map((p) => {
      const row = document.createElement("li");
      row.className = "result-row";
      row.dataset.label = p.label;
      row.dataset.score = String(p.score);
      row.dataset.logit = String(p.logit);
      row.dataset.index = String(p.index);

      const label = document.createElement("span");
      label.className = "result-label";
      label.textContent = p.label;
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("div");
      fill.className = "bar-fill";
      fill.style.width = `${Math.min(100, Math.max(0, p.score * 100))}%`;
      bar.append(fill);
      const score = document.createElement("span");
      score.className = "result-score";
      score.textContent = `${(p.score * 100).toFixed(2)}%`;
      const logit = document.createElement("span");
      logit.className = "result-logit";
      logit.textContent = `logit ${p.logit.toFixed(3)}`;

      row.append(label, bar, score, logit);
      return row;
    }));
    el.placeholder.hidden = predictions.length > 0;
  }

  function showAnswered(response, elapsedMs) {
    el.latency.textContent = `latency ${elapsedMs.toFixed(1)} ms (measured in this page)`;
    const model = response.headers.get("Cliplora-Model");
    const version = response.headers.get("Cliplora-Version");
    const adapter = response.headers.get("Cliplora-Adapter");
    const parts = [];
    if (model) parts.push(model);
    if (version) parts.push(`version ${version}`);
    if (adapter) parts.push(`adapter ${adapter}`);
    el.version.textContent = parts.join(" · ");
  }

  /** On one column (a phone) the answer is below the form: bring it up when it comes. */
  function revealOutput() {
    const box = el.output.getBoundingClientRect();
    if (box.top > window.innerHeight / 2 || box.bottom < 0) el.output.scrollIntoView({ block: "start" });
  }

  function finish(request, outcome, errorMessage = "") {
    if (request !== state.request) return;  // a later click owns the output now
    if (errorMessage) {
      el.results.replaceChildren();
      el.placeholder.hidden = true;
    }
    showError(errorMessage);
    el.classify.disabled = false;
    el.classify.textContent = "Classify";
    el.output.dataset.state = outcome;
    revealOutput();
  }

  async function classify(event) {
    event.preventDefault();
    const request = ++state.request;
    el.output.dataset.request = String(request);
    el.output.dataset.state = "busy";
    el.latency.textContent = "";
    el.version.textContent = "";
    const model = selectedModel();
    if (!model) return finish(request, "error", "Pick a model first.");
    if (!state.file) return finish(request, "error", "Choose an image first: drop one, paste one or pick a file.");

    el.classify.disabled = true;
    el.classify.textContent = "Classifying…";
    let body;
    try {
      body = JSON.stringify(requestBody(model, await base64Of(state.file)));
    } catch (err) {
      return finish(request, "error", `Cannot read the image: ${err.message}`);
    }
    const headers = { "Content-Type": "application/json", ...authHeaders() };
    const started = performance.now();
    let response;
    let answer = null;
    let failure = "";
    try {
      response = await fetch("/v1/classify", { method: "POST", headers, body });
      if (response.ok) answer = await response.json();
      else failure = await errorText(response);
    } catch (err) {
      failure = `Could not reach the gateway: ${err.message}`;
    }
    const elapsedMs = performance.now() - started;
    if (request !== state.request) return undefined;
    if (response) showAnswered(response, elapsedMs);
    if (failure) return finish(request, "error", failure);
    if (!Array.isArray(answer) || !answer.length || !Array.isArray(answer[0].predictions)) {
      return finish(request, "error", `Unexpected answer: ${JSON.stringify(answer).slice(0, 200)}`);
    }
    renderPredictions(answer[0].predictions);
    return finish(request, "done");
  }

  // --- start --------------------------------------------------------------------------------------

  el.token.value = storedToken();
  if (el.token.value) el.tokenBox.open = true;
  el.token.addEventListener("change", () => {
    storeToken(el.token.value.trim());
    loadModels();
  });
  el.model.addEventListener("change", onModelChange);
  el.form.addEventListener("submit", classify);
  wireImageInputs();
  loadModels();
})();
