/* LocalAI Cluster operator console: the API keys page's copy button, the playground (streamed chat and
   embeddings through the page's gateway door) and the overview's live charts (vendored uPlot). */
(function () {
  "use strict";

  const $ = (selector, root) => (root || document).querySelector(selector);
  const $$ = (selector, root) => Array.from((root || document).querySelectorAll(selector));

  function csrfToken() {
    try {
      return JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRFToken"] || "";
    } catch (error) {
      return "";
    }
  }

  /* ---------------------------------------------------------------- API keys: copy once */

  document.addEventListener("focusin", (event) => {
    if (event.target.matches && event.target.matches("[data-select-on-focus]")) event.target.select();
  });
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const input = $(button.dataset.copy);
    const state = document.getElementById(button.getAttribute("aria-describedby"));
    let copied = false;
    try {
      await navigator.clipboard.writeText(input.value);
      copied = true;
    } catch (error) {
      input.focus();
      input.select();
      try { copied = document.execCommand("copy"); } catch (ignored) { copied = false; }
    }
    if (state) state.textContent = copied ? "Copied." : "Selected: press Ctrl+C to copy.";
  });

  // A freshly created key takes the focus (selected: Ctrl+C copies it), so keyboard users land on it.
  document.addEventListener("htmx:afterSettle", () => {
    const target = $("[data-autofocus]");
    if (!target) return;
    target.removeAttribute("data-autofocus");
    target.focus();
  });

  /* ---------------------------------------------------------------- models page: the import panel */

  // A button with data-toggle-panel shows or hides a panel (its aria-expanded follows); opening moves the
  // focus to the panel's first field, closing it back to the page's opener.
  document.addEventListener("click", (event) => {
    const button = event.target.closest("[data-toggle-panel]");
    if (!button) return;
    const panel = $(button.dataset.togglePanel);
    if (!panel) return;
    const open = panel.hidden;
    panel.hidden = !open;
    $$('[data-toggle-panel="' + button.dataset.togglePanel + '"][aria-expanded]').forEach((opener) => {
      opener.setAttribute("aria-expanded", open ? "true" : "false");
      if (!open) opener.focus();
    });
    if (open) {
      const field = $("input:not([type=hidden]), select, textarea", panel);
      if (field) field.focus();
    }
  });

  // "Load one now" answers when the load is over; meanwhile the table's poll may show the replica loading.
  // A poll swaps in a new form, so the forms whose load is under way are remembered and marked busy again.
  const loadsUnderWay = new Set();
  const markLoads = () => {
    $$("form[data-load-now]").forEach((form) => {
      const busy = loadsUnderWay.has(form.getAttribute("hx-post"));
      form.classList.toggle("is-busy", busy);
      const button = $("button", form);
      if (button) button.disabled = busy;
    });
  };
  document.addEventListener("htmx:beforeRequest", (event) => {
    const form = event.detail.elt;
    if (!(form.matches && form.matches("form[data-load-now]"))) return;
    const url = form.getAttribute("hx-post");
    loadsUnderWay.add(url);
    // Listened to on the form itself: once a poll has swapped it out, its events no longer reach the document.
    form.addEventListener(
      "htmx:afterRequest",
      () => {
        loadsUnderWay.delete(url);
        markLoads();
      },
      { once: true }
    );
  });
  document.addEventListener("htmx:afterSettle", markLoads);

  /* ---------------------------------------------------------------- playground */

  function initPlayground(root) {
    const model = $("#pg-model", root);
    const transcript = $("#pg-transcript", root);
    const chatForm = $("#pg-chat-form", root);
    const prompt = $("#pg-prompt", root);
    const send = $("#pg-send", root);
    const stop = $("#pg-stop", root);
    const chatError = $("#pg-chat-error", root);
    const embedForm = $("#pg-embed-form", root);
    const embedError = $("#pg-embed-error", root);
    const history = [];
    let controller = null;

    const served = (name, value) => { $(`[data-served="${name}"]`, root).textContent = value; };
    const ms = (value) => (value < 1000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(2)} s`);
    const showError = (box, message) => { box.textContent = message; box.hidden = !message; };

    $$('input[name="pg-mode"]', root).forEach((radio) => radio.addEventListener("change", () => {
      $$("[data-mode-panel]", root).forEach((panel) => { panel.hidden = panel.dataset.modePanel !== radio.value; });
    }));

    function bubble(role, text) {
      const item = document.createElement("li");
      item.className = `bubble bubble-${role}`;
      item.dataset.role = role;
      const who = document.createElement("span");
      who.className = "bubble-role";
      who.textContent = role === "user" ? "You" : "Model";
      const body = document.createElement("div");
      body.className = "bubble-text";
      body.textContent = text;
      item.append(who, body);
      transcript.append(item);
      item.scrollIntoView({ block: "end" });
      return body;
    }

    function served_by(response) {
      served("node", response.headers.get("X-LocalAI-Node") || "–");
      served("replica", response.headers.get("X-LocalAI-Replica") || "–");
    }

    async function errorOf(response) {
      try {
        const body = await response.json();
        return (body.error && (body.error.message || body.error)) || `The server answered ${response.status}.`;
      } catch (error) {
        return response.status === 403
          ? "Refused (403): your session may have expired or the page's CSRF token is stale; reload the page."
          : `The server answered ${response.status}.`;
      }
    }

    function post(url, body, signal) {
      return fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
        body: JSON.stringify(body),
        credentials: "same-origin",
        signal,
      });
    }

    async function chat(text) {
      showError(chatError, "");
      history.push({ role: "user", content: text });
      bubble("user", text);
      const answer = bubble("assistant", "");
      answer.parentElement.setAttribute("aria-busy", "true");
      ["node", "replica", "ttft", "total"].forEach((name) => served(name, "…"));
      controller = new AbortController();
      send.disabled = true;
      stop.disabled = false;
      const started = performance.now();
      let firstAt = null;
      let content = "";
      try {
        const response = await post(root.dataset.chatUrl, { model: model.value, messages: history, stream: true }, controller.signal);
        if (!response.ok) throw new Error(await errorOf(response));
        served_by(response);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        let done = false;
        while (!done) {
          const chunk = await reader.read();
          if (chunk.done) break;
          buffer += decoder.decode(chunk.value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const event = buffer.slice(0, cut).trim();
            buffer = buffer.slice(cut + 2);
            if (!event.startsWith("data:")) continue;
            const data = event.slice(5).trim();
            if (data === "[DONE]") { done = true; break; }
            const payload = JSON.parse(data);
            if (payload.error) throw new Error(payload.error.message || "The stream broke.");
            const delta = payload.choices && payload.choices[0] && payload.choices[0].delta;
            if (delta && delta.content) {
              if (firstAt === null) {
                firstAt = performance.now();
                served("ttft", ms(firstAt - started));
              }
              content += delta.content;
              answer.textContent = content;
            }
          }
        }
        history.push({ role: "assistant", content });
        served("total", ms(performance.now() - started));
        if (firstAt === null) served("ttft", "–");
      } catch (error) {
        history.pop();
        const stopped = error.name === "AbortError";
        answer.parentElement.classList.add("bubble-failed");
        answer.textContent = content || (stopped ? "(stopped)" : "(no answer)");
        if (!stopped) showError(chatError, error.message);
        served("total", ms(performance.now() - started));
        if (firstAt === null) served("ttft", "–");
      } finally {
        answer.parentElement.removeAttribute("aria-busy");
        controller = null;
        send.disabled = false;
        stop.disabled = true;
      }
    }

    chatForm.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = prompt.value.trim();
      if (!text || controller) return;
      if (!model.value) { showError(chatError, "Choose a model first."); return; }
      prompt.value = "";
      chat(text);
    });
    prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        chatForm.requestSubmit();
      }
    });
    stop.addEventListener("click", () => { if (controller) controller.abort(); });
    $("#pg-clear", root).addEventListener("click", () => {
      if (controller) controller.abort();
      history.length = 0;
      transcript.replaceChildren();
      showError(chatError, "");
      prompt.focus();
    });

    function cosine(a, b) {
      let dot = 0, na = 0, nb = 0;
      for (let i = 0; i < a.length; i += 1) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
      return na && nb ? dot / Math.sqrt(na * nb) : 0;
    }

    embedForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      showError(embedError, "");
      if (!model.value) { showError(embedError, "Choose a model first."); return; }
      const button = $("#pg-embed", root);
      button.disabled = true;
      ["node", "replica", "ttft", "total"].forEach((name) => served(name, "…"));
      const started = performance.now();
      try {
        const input = [$("#pg-embed-a", root).value, $("#pg-embed-b", root).value];
        const response = await post(root.dataset.embeddingsUrl, { model: model.value, input });
        if (!response.ok) throw new Error(await errorOf(response));
        served_by(response);
        const body = await response.json();
        const [a, b] = body.data.map((item) => item.embedding);
        $('[data-embed="size"]', root).textContent = String(a.length);
        $('[data-embed="cosine"]', root).textContent = cosine(a, b).toFixed(4);
        served("ttft", "–");
      } catch (error) {
        showError(embedError, error.message);
        ["node", "replica", "ttft"].forEach((name) => served(name, "–"));
      } finally {
        served("total", ms(performance.now() - started));
        button.disabled = false;
      }
    });
  }

  /* ---------------------------------------------------------------- overview charts */

  const COLORS = ["#7c8cff", "#3ecf8e", "#f5a524", "#4cb4ff", "#f0566b", "#c792ea", "#ffcb6b", "#89ddff"];
  const GIB = 1024 ** 3;

  function initCharts(root) {
    const state = $("#charts-state", root);
    const charts = {};
    let windowEnd = Date.now() / 1000;
    const axis = { stroke: "#8b92a5", grid: { stroke: "#2a2f3d", width: 1 }, ticks: { stroke: "#2a2f3d", width: 1 } };

    function options(el, series) {
      return {
        width: Math.max(240, el.clientWidth),
        height: 180,
        legend: { show: true, live: false },
        cursor: { drag: { x: false, y: false } },
        scales: { x: { time: true, range: () => [windowEnd - 3600, windowEnd] } },
        axes: [{ ...axis }, { ...axis, size: 52 }],
        series: [{}, ...series],
      };
    }

    const line = (label, stroke, extra) => ({ label, stroke, width: 2, spanGaps: false, points: { show: false }, ...(extra || {}) });
    const fixed = {
      rps: (d) => ({ series: [line("req/s", COLORS[0])], data: [d.rps], now: (v) => `now ${fmt(v[0])} req/s` }),
      error_rate: (d) => ({ series: [line("5xx %", COLORS[4])], data: [d.error_rate], now: (v) => `now ${v[0] == null ? "–" : fmt(v[0]) + " %"}` }),
      latency: (d) => ({ series: [line("p50 ms", COLORS[0]), line("p99 ms", COLORS[2])], data: [d.p50_ms, d.p99_ms], now: (v) => `now p50 ${fmt(v[0])} ms, p99 ${fmt(v[1])} ms` }),
      in_flight: (d) => ({ series: [line("in flight", COLORS[3])], data: [d.in_flight], now: (v) => `now ${fmt(v[0])}` }),
      loaded: (d) => ({ series: [line("loaded", COLORS[1])], data: [d.loaded], now: (v) => `now ${fmt(v[0])}` }),
      vram: (d) => {
        const names = Object.keys(d.nodes);
        const series = [];
        const data = [];
        names.forEach((name, i) => {
          const color = COLORS[i % COLORS.length];
          series.push(line(`${name} used`, color));
          series.push(line(`${name} reserved`, color, { dash: [6, 4], width: 1.5 }));
          data.push(d.nodes[name].used.map((v) => (v == null ? null : v / GIB)));
          data.push(d.nodes[name].reserved.map((v) => (v == null ? null : v / GIB)));
        });
        const now = (v) => names.map((name, i) => `${name} ${fmt(v[2 * i])} / ${fmt(v[2 * i + 1])} GiB`).join("; ") || "no nodes";
        return { series, data, now, key: names.join("\n") };
      },
    };

    function fmt(value) {
      if (value == null || Number.isNaN(value)) return "–";
      return Math.abs(value) >= 100 ? String(Math.round(value)) : String(Math.round(value * 100) / 100);
    }

    function draw(samples) {
      windowEnd = Date.now() / 1000;
      const t = samples.t;
      for (const el of $$("[data-chart]", root)) {
        const name = el.dataset.chart;
        const spec = fixed[name](samples);
        const key = spec.key || "";
        const data = [t, ...spec.data];
        const last = spec.data.map((column) => (column.length ? column[column.length - 1] : null));
        $(`[data-now="${name}"]`, root).textContent = t.length ? spec.now(last) : "";
        const chart = charts[name];
        if (chart && chart.key === key) {
          chart.plot.setData(data);
        } else {
          if (chart) chart.plot.destroy();
          charts[name] = { key, plot: new window.uPlot(options(el, spec.series), data, el) };
        }
      }
      state.textContent = t.length
        ? `${t.length} sample(s), last at ${new Date(t[t.length - 1] * 1000).toLocaleTimeString()}.`
        : "No samples yet: the first one is stored by the next health tick.";
      root.dataset.samples = String(t.length);
    }

    async function refresh() {
      if (document.hidden) return;
      try {
        const response = await fetch(root.dataset.samplesUrl, { credentials: "same-origin", headers: { Accept: "application/json" } });
        if (!response.ok) throw new Error(`the server answered ${response.status}`);
        draw(await response.json());
      } catch (error) {
        state.textContent = `Could not refresh the charts: ${error.message}.`;
      }
    }

    const resize = new ResizeObserver(() => {
      for (const el of $$("[data-chart]", root)) {
        const chart = charts[el.dataset.chart];
        if (chart) chart.plot.setSize({ width: Math.max(240, el.clientWidth), height: 180 });
      }
    });
    $$("[data-chart]", root).forEach((el) => resize.observe(el));
    refresh();
    setInterval(refresh, Math.max(5, Number(root.dataset.refresh) || 15) * 1000);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const playground = $("#playground");
    if (playground) initPlayground(playground);
    const charts = $("#charts");
    if (charts && window.uPlot) initCharts(charts);
  });
})();
