/* LocalAI Cluster operator pages: only what HTMX does not do itself.
   Toasts, the confirm dialog (focus trapped), kebab menus, drawers, the capacity editor's Enter/Esc,
   key=value chips and presets of the rule form, and the live logs WebSocket. */
(function () {
  "use strict";

  const $ = (selector, root) => (root || document).querySelector(selector);
  const $$ = (selector, root) => Array.from((root || document).querySelectorAll(selector));

  /* ---------------------------------------------------------------- toasts */

  function showToast(message, level) {
    const region = $("#toasts");
    if (!region || !message) return;
    const toast = document.createElement("div");
    toast.className = "toast " + (level === "error" ? "toast-error" : "toast-success");
    const text = document.createElement("span");
    text.textContent = message;
    const close = document.createElement("button");
    close.type = "button";
    close.className = "toast-close";
    close.setAttribute("aria-label", "Dismiss");
    close.textContent = "×";
    toast.append(text, close);
    region.append(toast);
    setTimeout(() => toast.remove(), level === "error" ? 10000 : 5000);
  }
  window.lacToast = showToast;

  document.addEventListener("toast", (event) => {
    const detail = event.detail || {};
    showToast(detail.message, detail.level);
  });
  document.addEventListener("click", (event) => {
    const close = event.target.closest(".toast-close");
    if (close) close.closest(".toast").remove();
  });
  // Errors without a toast of their own (5xx, lost connection) still say something.
  document.addEventListener("htmx:responseError", (event) => {
    const xhr = event.detail.xhr;
    if ((xhr.getResponseHeader("HX-Trigger") || "").includes('"toast"')) return;
    showToast("The server answered " + xhr.status + (xhr.statusText ? " " + xhr.statusText : "") + ".", "error");
  });
  document.addEventListener("htmx:sendError", (event) => {
    if (event.detail.requestConfig && event.detail.requestConfig.verb === "get") return; // a missed poll
    showToast("The control plane could not be reached.", "error");
  });

  /* ---------------------------------------------------------------- polling guard */

  // Polls pause while a dialog or a menu is open, so they never pull an element out from under the user.
  window.lacPollAllowed = function () {
    return !document.querySelector("dialog[open]") && !document.querySelector(".menu-list:not([hidden])");
  };

  // A poll answer is dropped when an action completed while it was on its way: it may describe the state
  // from before the action and would overwrite the action's fresher answer until the next poll.
  let actionsDone = 0;
  const isPoll = (elt) => elt instanceof Element && elt.hasAttribute("data-poll");
  document.addEventListener("htmx:beforeRequest", (event) => {
    if (isPoll(event.target)) event.target.dataset.pollAfter = String(actionsDone);
  });
  document.addEventListener("htmx:afterRequest", (event) => {
    if (!isPoll(event.target)) actionsDone += 1;
  });
  document.addEventListener("htmx:beforeSwap", (event) => {
    // Fired on the swap's target; the element that made the request is in the request's config.
    const source = event.detail.requestConfig && event.detail.requestConfig.elt;
    if (isPoll(source) && source.dataset.pollAfter !== String(actionsDone)) {
      event.detail.shouldSwap = false;
    }
  });

  /* ---------------------------------------------------------------- dialogs */

  const FOCUSABLE = "button:not([disabled]), [href], input:not([disabled]):not([type=hidden]), select, textarea, [tabindex]:not([tabindex='-1'])";

  function trapFocus(dialog, event) {
    if (event.key !== "Tab") return;
    const items = $$(FOCUSABLE, dialog).filter((el) => el.offsetParent !== null);
    if (!items.length) return;
    const first = items[0];
    const last = items[items.length - 1];
    if (event.shiftKey && document.activeElement === first) {
      event.preventDefault();
      last.focus();
    } else if (!event.shiftKey && document.activeElement === last) {
      event.preventDefault();
      first.focus();
    }
  }

  // Opens the confirm dialog; resolves true when confirmed. Focus returns to where it was.
  function confirmDialog({ title, message, action, danger }) {
    const dialog = $("#confirm-dialog");
    const opener = document.activeElement;
    $("#confirm-title", dialog).textContent = title || "Are you sure?";
    $("#confirm-message", dialog).textContent = message || "";
    const ok = $("[data-dialog-confirm]", dialog);
    ok.textContent = action || "Confirm";
    ok.classList.toggle("danger", danger !== false);
    ok.classList.toggle("primary", danger === false);
    dialog.returnValue = "";
    return new Promise((resolve) => {
      const onKey = (event) => trapFocus(dialog, event);
      dialog.addEventListener("keydown", onKey);
      dialog.addEventListener(
        "close",
        () => {
          dialog.removeEventListener("keydown", onKey);
          if (opener && opener.isConnected) opener.focus();
          resolve(dialog.returnValue === "confirm");
        },
        { once: true }
      );
      dialog.showModal();
      $("[data-dialog-cancel]", dialog).focus();
    });
  }
  window.lacConfirm = confirmDialog;

  // hx-confirm opens our dialog; the capacity form asks a soft confirm when shrinking below loaded replicas.
  document.addEventListener("htmx:confirm", (event) => {
    const elt = event.detail.elt;
    let question = event.detail.question;
    let options = {
      title: elt.dataset.confirmTitle,
      action: elt.dataset.confirmAction,
    };
    if (elt.matches("[data-shrink-guard]")) {
      const value = parseInt($("input[name=value]", elt).value, 10);
      const most = parseInt(elt.dataset.loadedMost || "0", 10);
      if (value > 0 && value < most) {
        question =
          elt.dataset.loadedModel + " has " + most + " replicas loaded on " + elt.dataset.nodeName + ". " +
          "Lowering the cap to " + value + " stops nothing now; the reconciler trims idle replicas above it later.";
        options = { title: "Shrink below loaded replicas?", action: "Lower to " + value, danger: false };
      }
    }
    if (!question) return;
    event.preventDefault();
    confirmDialog({ ...options, message: question }).then((ok) => {
      if (ok) event.detail.issueRequest(true);
    });
  });

  /* ---------------------------------------------------------------- kebab menus */

  function closeMenus(except) {
    $$(".menu-list:not([hidden])").forEach((list) => {
      if (list === except) return;
      list.hidden = true;
      const button = list.parentElement.querySelector(".menu-button");
      if (button) button.setAttribute("aria-expanded", "false");
    });
  }

  function openMenu(button, focusLast) {
    const list = document.getElementById(button.getAttribute("aria-controls"));
    closeMenus(list);
    list.hidden = false;
    button.setAttribute("aria-expanded", "true");
    const items = $$("[role=menuitem]", list);
    if (items.length) (focusLast ? items[items.length - 1] : items[0]).focus();
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest(".menu-button");
    if (button) {
      event.stopPropagation();
      if (button.getAttribute("aria-expanded") === "true") closeMenus();
      else openMenu(button);
      return;
    }
    if (event.target.closest("[role=menuitem]")) {
      closeMenus();
      return;
    }
    if (!event.target.closest(".menu-list")) closeMenus();
  });

  document.addEventListener("keydown", (event) => {
    const button = event.target.closest && event.target.closest(".menu-button");
    if (button && (event.key === "ArrowDown" || event.key === "ArrowUp")) {
      event.preventDefault();
      openMenu(button, event.key === "ArrowUp");
      return;
    }
    const list = event.target.closest && event.target.closest(".menu-list");
    if (!list) return;
    const items = $$("[role=menuitem]", list);
    const index = items.indexOf(document.activeElement);
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      const step = event.key === "ArrowDown" ? 1 : -1;
      items[(index + step + items.length) % items.length].focus();
    } else if (event.key === "Home" || event.key === "End") {
      event.preventDefault();
      items[event.key === "Home" ? 0 : items.length - 1].focus();
    } else if (event.key === "Escape" || event.key === "Tab") {
      const owner = list.parentElement.querySelector(".menu-button");
      closeMenus();
      if (event.key === "Escape") {
        event.preventDefault();
        owner.focus();
      }
    }
  });

  /* ---------------------------------------------------------------- node drawers */

  function setDrawer(row, open) {
    const drawer = document.getElementById(row.dataset.drawer);
    if (!drawer) return;
    drawer.hidden = !open;
    const toggle = $(".node-toggle", row);
    if (toggle) toggle.setAttribute("aria-expanded", String(open));
    row.classList.toggle("open", open);
    const body = $(".drawer-body", drawer);
    if (open && body && !body.hasAttribute("data-loaded")) {
      body.setAttribute("data-loaded", "");
      htmx.trigger(body, "drawer-open");
    }
  }

  document.addEventListener("click", (event) => {
    const row = event.target.closest("tr.node-row");
    if (!row) return;
    const toggle = event.target.closest(".node-toggle");
    // Clicks on the row's own controls do their own thing; the rest of the row toggles the drawer.
    if (!toggle && event.target.closest("button, a, input, form, .menu")) return;
    if (!toggle && window.getSelection && String(window.getSelection())) return; // selecting text
    const drawer = document.getElementById(row.dataset.drawer);
    setDrawer(row, drawer ? drawer.hidden : false);
  });

  // After a poll or an action replaced rows, rows whose drawer is open (kept by hx-preserve) say so again.
  function syncRows() {
    $$("tr.node-row").forEach((row) => {
      const drawer = document.getElementById(row.dataset.drawer);
      const open = !!drawer && !drawer.hidden;
      const toggle = $(".node-toggle", row);
      if (toggle) toggle.setAttribute("aria-expanded", String(open));
      row.classList.toggle("open", open);
    });
  }
  document.addEventListener("htmx:afterSettle", syncRows);
  document.addEventListener("htmx:oobAfterSwap", syncRows);
  document.addEventListener("DOMContentLoaded", syncRows);

  /* ---------------------------------------------------------------- capacity editor */

  function capacityEditing(box, editing) {
    const view = $(".cap-view", box);
    const form = $(".cap-form", box);
    const input = $("input[name=value]", form);
    view.hidden = editing;
    form.hidden = !editing;
    if (editing) {
      input.focus();
      input.select();
    } else {
      input.value = input.dataset.original;
      const error = $(".field-error", form);
      if (error) error.remove();
      input.removeAttribute("aria-invalid");
      $("[data-cap-edit]", box).focus();
    }
  }

  document.addEventListener("click", (event) => {
    const edit = event.target.closest("[data-cap-edit]");
    if (edit) capacityEditing(edit.closest("[data-capacity]"), true);
    const cancel = event.target.closest("[data-cap-cancel]");
    if (cancel) capacityEditing(cancel.closest("[data-capacity]"), false);
  });
  // Enter submits the form natively; Esc cancels.
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    const box = event.target.closest && event.target.closest("[data-capacity]");
    if (box && !$(".cap-form", box).hidden) {
      event.preventDefault();
      capacityEditing(box, false);
    }
  });
  // A capacity editor that came back with an error keeps the focus in its input.
  document.addEventListener("htmx:afterSwap", (event) => {
    const target = event.detail.target;
    if (target && target.matches && target.matches("[data-capacity]")) {
      const form = $(".cap-form", target);
      if (form && !form.hidden) $("input[name=value]", form).focus();
    }
  });

  /* ---------------------------------------------------------------- rule form */

  function addChip(box) {
    const keyInput = $("[data-chip-key]", box);
    const valueInput = $("[data-chip-value]", box);
    const key = keyInput.value.trim();
    const value = valueInput.value.trim();
    if (!key) {
      keyInput.focus();
      return;
    }
    const list = $("[data-chip-list]", box);
    $$("input[type=hidden]", list).forEach((input) => {
      if (input.value.split("=")[0] === key) input.closest("li").remove(); // same key: replace it
    });
    const chip = document.createElement("li");
    chip.className = "chip";
    const text = document.createElement("span");
    text.textContent = key + "=" + value;
    const hidden = document.createElement("input");
    hidden.type = "hidden";
    hidden.name = box.dataset.kvName;
    hidden.value = key + "=" + value;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "chip-remove";
    remove.setAttribute("data-chip-remove", "");
    remove.setAttribute("aria-label", "Remove " + key + "=" + value);
    remove.textContent = "×";
    chip.append(text, hidden, remove);
    list.insertBefore(chip, $(".chips-empty", list));
    keyInput.value = "";
    valueInput.value = "";
    keyInput.focus();
  }

  document.addEventListener("click", (event) => {
    const add = event.target.closest("[data-chip-add]");
    if (add) addChip(add.closest("[data-kv-chips]"));
    const remove = event.target.closest("[data-chip-remove]");
    if (remove) {
      const box = remove.closest("[data-kv-chips]");
      remove.closest("li").remove();
      if (box) $("[data-chip-key]", box).focus();
    }
    const preset = event.target.closest("[data-preset-for]");
    if (preset) {
      const input = document.getElementById(preset.dataset.presetFor);
      input.value = preset.dataset.value;
      input.dispatchEvent(new Event("input", { bubbles: true }));
    }
    const closer = event.target.closest("[data-close-panel]");
    if (closer) {
      const panel = $(closer.dataset.closePanel);
      if (panel) panel.innerHTML = "";
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    const box = event.target.closest && event.target.closest("[data-kv-chips]");
    if (box && event.target.matches("[data-chip-key], [data-chip-value]")) {
      event.preventDefault(); // Enter in a chip input adds the chip instead of saving the form
      addChip(box);
    }
  });

  function syncPresets(root) {
    $$("[data-preset-for]", root).forEach((preset) => {
      const input = document.getElementById(preset.dataset.presetFor);
      const current = input && (input.value === "" && preset.dataset.value === "0" ? "0" : input.value);
      preset.setAttribute("aria-pressed", String(!!input && current === preset.dataset.value));
    });
  }
  document.addEventListener("input", (event) => {
    if (event.target.matches("#rule-min, #rule-max")) syncPresets(document);
  });
  document.addEventListener("htmx:afterSettle", (event) => {
    syncPresets(document);
    const trigger = event.detail.requestConfig && event.detail.requestConfig.elt;
    const selector = trigger && trigger.dataset && trigger.dataset.focusAfter;
    if (selector && $(selector)) $(selector).focus();
  });
  document.addEventListener("DOMContentLoaded", () => syncPresets(document));

  /* ---------------------------------------------------------------- live logs */

  function startLogs(view) {
    const state = $("#log-conn");
    const count = $("#log-count");
    const follow = $("#log-follow");
    const showKey = view.dataset.showKey === "true";
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const url = scheme + location.host + view.dataset.wsPath;
    let socket = null;
    let attempt = 0;
    let total = 0;
    let leaving = false;

    function setState(name, text) {
      state.dataset.state = name;
      state.textContent = text;
    }

    function render(line) {
      const row = document.createElement("div");
      row.className = "log-line " + (line.stream === "stderr" ? "stderr" : "stdout");
      const time = document.createElement("time");
      const at = new Date(line.timestamp * 1000);
      time.dateTime = at.toISOString();
      time.textContent = at.toLocaleTimeString([], { hour12: false }) + "." + String(at.getMilliseconds()).padStart(3, "0");
      const stream = document.createElement("span");
      stream.className = "log-stream";
      stream.textContent = line.stream;
      row.append(time, stream);
      if (showKey) {
        const key = document.createElement("span");
        key.className = "log-key";
        key.textContent = line.process_key;
        row.append(key);
      }
      const text = document.createElement("span");
      text.className = "log-text";
      text.textContent = line.text;
      row.append(text);
      return row;
    }

    function append(lines, replace) {
      if (replace) {
        $$(".log-line", view).forEach((el) => el.remove());
        total = 0;
      }
      const fragment = document.createDocumentFragment();
      lines.forEach((line) => fragment.append(render(line)));
      view.append(fragment);
      total += lines.length;
      $("#log-empty").hidden = total > 0;
      count.textContent = total + (total === 1 ? " line" : " lines");
      if (follow.checked) view.scrollTop = view.scrollHeight;
    }

    function connect() {
      setState(attempt ? "reconnecting" : "connecting", attempt ? "Reconnecting…" : "Connecting…");
      socket = new WebSocket(url);
      socket.addEventListener("message", (event) => {
        const message = JSON.parse(event.data);
        if (message.type === "initial") {
          attempt = 0;
          setState("live", "Live");
          append(message.lines, true); // after a reconnect the agent's buffer replaces what we had
        } else if (message.type === "line") {
          append([message.line], false);
        } else if (message.type === "error") {
          setState("reconnecting", message.message);
        }
      });
      socket.addEventListener("close", (event) => {
        if (leaving) return;
        if (event.code === 4403) {
          setState("closed", "Not allowed: sign in as staff.");
          return;
        }
        if (event.code === 4404) {
          setState("closed", "No such node.");
          return;
        }
        attempt += 1;
        setState("reconnecting", "Reconnecting…");
        setTimeout(connect, Math.min(500 * 2 ** (attempt - 1), 5000));
      });
    }

    $$("input[name=log-filter]").forEach((radio) =>
      radio.addEventListener("change", () => {
        view.dataset.filter = radio.value;
        if (follow.checked) view.scrollTop = view.scrollHeight;
      })
    );
    follow.addEventListener("change", () => {
      if (follow.checked) view.scrollTop = view.scrollHeight;
    });
    // Scrolling up stops following; scrolling back to the end resumes it.
    view.addEventListener("wheel", () => {
      requestAnimationFrame(() => {
        follow.checked = view.scrollHeight - view.scrollTop - view.clientHeight < 8;
      });
    });
    window.addEventListener("pagehide", () => {
      leaving = true;
      if (socket) socket.close(1000);
    });
    window.lacLogSocket = () => socket; // for tests: drop the connection on purpose
    connect();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const view = $("#log-view");
    if (view && view.dataset.wsPath) startLogs(view);
  });
})();
