// The playground: try the model from a browser. Plain JavaScript, no build step.
//
// "Generate" starts a session from the seed words (POST sessions), then streams words into
// it (POST generate with stream: true); "Continue" streams more words into the same session.
// A server with several models (GET v1/models) gets a model picker; every request then names
// the chosen one. Every URL is relative to the page, so it works under a proxy's sub-path too.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("form");
  const output = $("output");
  const status = $("status");
  const errorBox = $("error");
  const buttons = { generate: $("generate"), continue: $("continue"), stop: $("stop") };
  // The request fields each input sets, to point at the input a 4xx names.
  const inputs = {
    model: $("model"),
    seed_words: $("seed"),
    top_k: $("top-k"),
    temperature: $("temperature"),
    max_words: $("max-words"),
    random_seed: $("random-seed"),
  };

  let sessionId = null;
  let running = null; // the AbortController of the request in flight

  function headers() {
    const h = { "Content-Type": "application/json", Accept: "application/json, text/event-stream" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // The model field of a request: only when the picker is shown (a server with several models).
  function chosenModel() {
    return $("model-choice").hidden ? {} : { model: inputs.model.value };
  }

  // -- errors ----------------------------------------------------------------------------------

  function clearError() {
    errorBox.hidden = true;
    errorBox.textContent = "";
    for (const input of Object.values(inputs)) input.removeAttribute("aria-invalid");
  }

  function showError(body, statusCode) {
    const detail = body && typeof body.detail === "string" ? body.detail : null;
    errorBox.textContent = detail || `The server answered ${statusCode || "with an error"}.`;
    errorBox.hidden = false;
    for (const e of (body && body.errors) || []) {
      const input = inputs[String(e.field).split(/[.[]/)[0]];
      if (input) input.setAttribute("aria-invalid", "true");
    }
  }

  async function errorOf(response) {
    try {
      return await response.json();
    } catch {
      return { detail: `The server answered ${response.status} ${response.statusText}.` };
    }
  }

  // -- the form --------------------------------------------------------------------------------

  // A number when the input holds one; otherwise its text, so the server names the problem.
  function numberOf(input) {
    const raw = input.value.trim();
    if (raw === "") return undefined;
    const value = Number(raw);
    return Number.isFinite(value) ? value : raw;
  }

  function sampling() {
    const body = {
      max_words: numberOf(inputs.max_words),
      top_k: numberOf(inputs.top_k),
      temperature: numberOf(inputs.temperature),
      random_seed: numberOf(inputs.random_seed),
    };
    for (const [k, v] of Object.entries(body)) if (v === undefined) delete body[k];
    return body;
  }

  function setRunning(controller) {
    running = controller;
    buttons.generate.disabled = !!controller;
    buttons.continue.disabled = !!controller || !sessionId;
    buttons.stop.disabled = !controller;
  }

  // -- the text --------------------------------------------------------------------------------

  // The seed as the session holds it, with the words outside the vocabulary marked.
  function renderSeed(session) {
    output.replaceChildren();
    const seed = document.createElement("span");
    seed.className = "seed";
    const unknown = new Set(session.unknown_words || []);
    const text = session.text || "";
    let at = 0;
    for (const word of session.words || []) {
      const found = text.indexOf(word, at);
      if (found < 0) continue; // a token written differently (a line break)
      seed.append(text.slice(at, found));
      if (unknown.has(word)) {
        const mark = document.createElement("mark");
        mark.className = "unknown";
        mark.title = "not in the model's vocabulary";
        mark.textContent = word;
        seed.append(mark);
      } else {
        seed.append(word);
      }
      at = found + word.length;
    }
    seed.append(text.slice(at));
    output.append(seed);
  }

  function appendWord(piece) {
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = piece;
    output.append(span);
  }

  // -- server-sent events over fetch (EventSource cannot POST) ---------------------------------

  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        const data = [];
        for (const line of frame.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) yield { name, data: JSON.parse(data.join("\n")) };
      }
    }
  }

  async function stream(body, controller) {
    const response = await fetch("generate", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ ...body, stream: true }),
      signal: controller.signal,
    });
    if (!response.ok) {
      showError(await errorOf(response), response.status);
      return;
    }
    let count = 0;
    status.textContent = "Generating…";
    for await (const event of events(response)) {
      if (event.name === "word") {
        appendWord(event.data.text);
        count += 1;
        status.textContent = `Generating… ${count} word${count === 1 ? "" : "s"}`;
      } else if (event.name === "done") {
        const d = event.data;
        const why = d.finish_reason === "stop" ? "a stop string" : "the word limit";
        status.textContent = `${d.words.length} words, ended by ${why}; random seed ${d.random_seed}.`;
      } else if (event.name === "error") {
        showError(event.data);
        status.textContent = "";
      }
    }
  }

  async function run(task) {
    clearError();
    const controller = new AbortController();
    setRunning(controller);
    try {
      await task(controller);
    } catch (err) {
      if (err.name === "AbortError") {
        status.textContent = "Stopped.";
      } else {
        showError({ detail: `The request failed: ${err.message}` });
      }
    } finally {
      setRunning(null);
    }
  }

  async function generate(controller) {
    const seedWords = inputs.seed_words.value;
    const previous = sessionId;
    sessionId = null;
    const created = await fetch("sessions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ ...chosenModel(), ...(seedWords.trim() ? { seed_words: seedWords } : {}) }),
      signal: controller.signal,
    });
    if (!created.ok) {
      showError(await errorOf(created), created.status);
      return;
    }
    const session = await created.json();
    if (previous) {
      // The old text is done with; its session would expire anyway.
      fetch(`sessions/${encodeURIComponent(previous)}`, { method: "DELETE", headers: headers() })
        .catch(() => {});
    }
    sessionId = session.session_id;
    renderSeed(session);
    await stream({ ...chosenModel(), session_id: sessionId, ...sampling() }, controller);
  }

  async function continueText(controller) {
    await stream({ ...chosenModel(), session_id: sessionId, ...sampling() }, controller);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run(generate);
  });
  buttons.continue.addEventListener("click", () => run(continueText));
  buttons.stop.addEventListener("click", () => running && running.abort());

  // -- the model card --------------------------------------------------------------------------

  function when(iso) {
    const date = iso ? new Date(iso) : null;
    if (!date || Number.isNaN(date.getTime())) return iso || "?";
    return date.toISOString().slice(0, 16).replace("T", " ") + " UTC";
  }

  function describe(info) {
    const a = info.architecture || {};
    const rows = [
      ["Model", info.model],
      ["Network", `${a.cell || "?"}, ${a.layers || "?"} layer(s), hidden ${a.hidden_dim || "?"}`],
      ["Parameters", Number(info.parameters).toLocaleString("en")],
      ["Vocabulary", `${Number(info.vocab_size).toLocaleString("en")} words`],
      ["Tokenizer", (info.tokenizer && info.tokenizer.name) || "?"],
      [
        "Perplexity",
        info.best_valid_perplexity == null
          ? "not measured"
          : `${info.best_valid_perplexity.toFixed(2)} (validation)`,
      ],
      ["Device", info.device],
      ["Trained", when(info.updated || info.created)],
      ["Max words", info.limits && info.limits.max_words],
    ];
    const dl = $("model-card");
    dl.replaceChildren();
    for (const [name, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value == null ? "?" : String(value);
      dl.append(dt, dd);
    }
    $("model-name").textContent = info.model;
  }

  async function loadCard() {
    try {
      const query = $("model-choice").hidden ? "" : `?model=${encodeURIComponent(inputs.model.value)}`;
      const response = await fetch(`info${query}`, { headers: headers() });
      if (!response.ok) {
        const body = await errorOf(response);
        $("model-name").textContent = body.detail || `model card unavailable (${response.status})`;
        return;
      }
      describe(await response.json());
    } catch (err) {
      $("model-name").textContent = `model card unavailable: ${err.message}`;
    }
  }

  // The picker, shown when the server has more than one model (default first).
  async function loadModels() {
    try {
      const response = await fetch("v1/models", { headers: headers() });
      if (!response.ok) return;
      const models = (await response.json()).data || [];
      if (models.length < 2) return;
      const previous = inputs.model.value;
      inputs.model.replaceChildren(
        ...models.map((m) => new Option(m.default ? `${m.id} (default)` : m.id, m.id)),
      );
      if (models.some((m) => m.id === previous)) inputs.model.value = previous;
      $("model-choice").hidden = false;
    } catch (err) {
      // No picker: requests go to the default model.
    }
  }

  async function loadAll() {
    await loadModels();
    await loadCard();
  }

  // A session belongs to its model: another model starts a new text.
  inputs.model.addEventListener("change", () => {
    sessionId = null;
    setRunning(running);
    loadCard();
  });
  $("api-key").addEventListener("change", loadAll);
  loadAll();
})();
