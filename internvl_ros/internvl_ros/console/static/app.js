// internvl console. Every text from the server (answers, prompts, topic names, diagnostics)
// goes into the page through textContent, never as markup.
"use strict";

const FRAME_PERIOD_MS = 250; // live view: 4 frames a second at most
const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

const state = {
  info: null,
  source: null, // selected image source id
  userPicked: false, // the user chose a source: do not follow the default any more
  ask: null, // id of the question in flight ("" until the server named it)
  cancelPending: false, // cancel was pressed before the question had an id
  historyAfter: 0,
  frameUrl: null,
};

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `${url}: HTTP ${r.status}`);
  return body;
}

function postJSON(url, obj) {
  return fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(obj),
  });
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fmtSeconds(s) {
  if (!(s > 0)) return "–";
  return s < 10 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(1)} s`;
}

function fmtStamp(sec) {
  if (!(sec > 0)) return "";
  if (sec > 1e9) return new Date(sec * 1000).toISOString().replace("T", " ").replace("Z", " UTC");
  return `${sec.toFixed(3)} s`;
}

// ------------------------------------------------------------------------------- sources

async function refreshSources() {
  let data;
  try {
    data = await getJSON("/api/sources");
  } catch (e) {
    return; // the server may be restarting: keep the list
  }
  const select = $("source");
  const ids = data.sources.map((s) => s.id);
  const current = Array.from(select.options).map((o) => o.value);
  if (ids.join("\n") !== current.join("\n")) {
    select.replaceChildren(...data.sources.map((s) => {
      const o = el("option", s.label);
      o.value = s.id;
      return o;
    }));
  }
  if (!state.userPicked || !ids.includes(state.source)) {
    state.source = data.default;
  }
  if (state.source !== null) select.value = state.source;
  select.disabled = ids.length === 0;
}

function onSourcePicked() {
  $("upload-message").textContent = "";
  state.source = $("source").value;
  state.userPicked = true;
}

// ------------------------------------------------------------------------------- live view

async function frameLoop() {
  for (;;) {
    const t0 = performance.now();
    try {
      await showFrame();
    } catch (e) {
      setFrameInfo(`live view: ${e.message}`);
    }
    await sleep(Math.max(50, FRAME_PERIOD_MS - (performance.now() - t0)));
  }
}

function setFrameInfo(text) {
  $("frame-info").textContent = text;
}

async function showFrame() {
  if (state.source === null) {
    $("frame-empty").textContent = state.info && state.info.mode === "ros"
      ? "no image topic found on the node yet" : "no image";
    return;
  }
  const r = await fetch(`/api/frame?source=${encodeURIComponent(state.source)}`,
    { cache: "no-store" });
  if (r.status === 204) {
    $("frame-empty").textContent = `waiting for a frame on ${state.source}…`;
    $("frame-empty").hidden = false;
    return;
  }
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    throw new Error(body.error || `HTTP ${r.status}`);
  }
  const meta = JSON.parse(r.headers.get("X-Frame-Info") || "{}");
  const blob = await r.blob();
  const url = URL.createObjectURL(blob);
  const img = $("frame");
  await new Promise((resolve) => {
    img.onload = resolve;
    img.onerror = resolve;
    img.src = url;
  });
  if (state.frameUrl) URL.revokeObjectURL(state.frameUrl);
  state.frameUrl = url;
  $("frame-empty").hidden = true;
  const parts = [meta.label, `${meta.width}x${meta.height}`];
  if (meta.encoding) parts.push(meta.encoding);
  if (meta.stamp) parts.push(`stamp ${fmtStamp(meta.stamp)}`);
  if (meta.age_s !== undefined) parts.push(`received ${meta.age_s.toFixed(1)} s ago`);
  setFrameInfo(parts.join(" · "));
}

// ------------------------------------------------------------------------------- asking

function setAsking(on) {
  $("send").disabled = on;
  $("cancel").disabled = !on;
  $("answer").dataset.state = on ? "streaming" : "done";
}

async function ask(event) {
  event.preventDefault();
  if (state.ask !== null) return;
  const prompt = $("prompt").value;
  state.ask = "";
  state.cancelPending = false;
  setAsking(true);
  for (const id of ["answer", "message", "ttft", "tps", "tokens", "finish"]) $(id).textContent = "";
  const empty = state.info.mode === "ros" ? "the node's default prompt" : "no text";
  $("asked").textContent = prompt ? `Q: ${prompt}` : `Q: (${empty})`;
  $("ask-state").textContent = "asking…";
  let done = null;
  try {
    const maxTokens = parseInt($("max-tokens").value, 10);
    const r = await postJSON("/api/ask", {
      prompt, source: state.source, max_new_tokens: maxTokens > 0 ? maxTokens : 0,
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error || `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (line) {
          const ev = JSON.parse(line);
          if (ev.event === "done") done = ev;
          onEvent(ev);
        }
      }
    }
    if (done === null) throw new Error("the answer stream ended early");
  } catch (e) {
    $("message").textContent = `error: ${e.message}`;
  } finally {
    state.ask = null;
    setAsking(false);
    $("ask-state").textContent = "";
  }
}

function onEvent(ev) {
  if (ev.event === "started") {
    state.ask = ev.id;
    $("ask-state").textContent = "waiting for the first token…";
    if (state.cancelPending) cancel();
  } else if (ev.event === "delta") {
    $("answer").textContent = ev.text;
    $("tokens").textContent = String(ev.tokens);
    if ($("ttft").textContent === "") $("ttft").textContent = `${fmtSeconds(ev.t)} (seen here)`;
    $("ask-state").textContent = "streaming…";
  } else if (ev.event === "done") {
    $("answer").textContent = ev.text;
    $("ttft").textContent = fmtSeconds(ev.ttft);
    $("tps").textContent = ev.tokens_per_second > 0 ? ev.tokens_per_second.toFixed(1) : "–";
    $("tokens").textContent = String(ev.tokens);
    $("finish").textContent = ev.finish_reason || "–";
    $("message").textContent = ev.success ? "" : ev.message;
    $("message").className = ev.success ? "message" : "message error";
  }
}

async function cancel() {
  if (state.ask === null) return;
  if (state.ask === "") { // not started yet: cancel as soon as it is
    state.cancelPending = true;
    return;
  }
  state.cancelPending = false;
  $("ask-state").textContent = "cancelling…";
  await postJSON("/api/cancel", { id: state.ask }).catch(() => null);
}

// ------------------------------------------------------------------------------- upload

async function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  const limit = state.info.max_upload_bytes;
  const say = (text) => { $("upload-message").textContent = text; };
  if (file.size > limit) {
    say(`${file.name} is ${(file.size / 1e6).toFixed(1)} MB; the console accepts at ` +
      `most ${(limit / 1e6).toFixed(1)} MB`);
    $("upload").value = "";
    return;
  }
  say("");
  try {
    const r = await fetch("/api/upload", {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream" },
      body: file,
    });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
    state.source = body.source;
    state.userPicked = true;
    await refreshSources();
  } catch (e) {
    say(`${file.name}: ${e.message}`);
  } finally {
    $("upload").value = "";
  }
}

// ------------------------------------------------------------------------------- history

async function pollHistory() {
  const data = await getJSON(`/api/history?after=${state.historyAfter}`);
  const list = $("history");
  for (const item of data.items) {
    state.historyAfter = Math.max(state.historyAfter, item.seq);
    const li = el("li", null, "caption");
    li.dataset.seq = String(item.seq);
    const head = el("div", null, "small muted");
    head.append(el("span", item.source, "badge"), " ",
      el("span", fmtStamp(item.stamp)), item.frame_id ? ` · ${item.frame_id}` : "",
      ` · ${item.finish_reason || "?"}`,
      item.ttft > 0 ? ` · TTFT ${fmtSeconds(item.ttft)}` : "",
      item.tokens_per_second > 0 ? ` · ${item.tokens_per_second.toFixed(1)} tok/s` : "");
    li.append(head, el("div", item.prompt, "prompt"), el("div", item.text, "text"));
    list.prepend(li);
  }
  while (list.children.length > 100) list.lastChild.remove();
}

// ------------------------------------------------------------------------------- status

async function pollStatus() {
  const s = await getJSON("/api/status");
  $("status-level").textContent = s.level;
  $("status-level").className = `level ${String(s.level).toLowerCase()}`;
  $("status-message").textContent = `${s.name}: ${s.message}` +
    (s.age_s !== null && s.age_s !== undefined ? ` (${s.age_s.toFixed(1)} s ago)` : "");
  const rows = s.values.map(([k, v]) => {
    const tr = el("tr");
    tr.append(el("th", k), el("td", v));
    return tr;
  });
  $("status-values").replaceChildren(...rows);
}

async function sourcesLoop() {
  for (;;) {
    // look again soon while the node has no image topic yet, then every 2 s
    await sleep($("source").options.length ? 2000 : 500);
    await refreshSources();
  }
}

async function poll(fn, period) {
  for (;;) {
    try {
      await fn();
    } catch (e) {
      // the server may be restarting: keep trying
    }
    await sleep(period);
  }
}

// ------------------------------------------------------------------------------- start

async function init() {
  state.info = await getJSON("/api/info");
  $("mode").textContent = state.info.mode === "ros" ? "ROS" : "offline";
  $("title").textContent = state.info.title;
  document.title = `internvl console: ${state.info.title}`;
  $("upload-box").hidden = !state.info.uploads;
  if (state.info.mode !== "ros") $("prompt").placeholder = "Ask about the image";
  $("source").addEventListener("change", onSourcePicked);
  $("upload").addEventListener("change", upload);
  $("ask-form").addEventListener("submit", ask);
  $("cancel").addEventListener("click", cancel);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask-form").requestSubmit();
  });
  $("prompt").maxLength = state.info.max_prompt_chars;
  $("max-tokens").max = state.info.max_new_tokens;
  await refreshSources();
  sourcesLoop();
  poll(pollHistory, POLL_MS);
  poll(pollStatus, POLL_MS);
  frameLoop();
  document.body.dataset.ready = "1";
}

init().catch((e) => {
  $("message").textContent = `could not start: ${e.message}`;
});
