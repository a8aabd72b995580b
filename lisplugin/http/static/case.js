// Case page: fields with cell outlines, leukocyte gallery, inspector with saliency, and
// reclassification by click or keyboard. Counts and flags come back from the server after
// every change (one aggregation, on the server); nothing is recomputed here.
"use strict";

(() => {
  const data = JSON.parse(document.getElementById("case-data").textContent);
  const { api } = lisplugin;
  const cells = data.result.cells;
  const style = Object.fromEntries(data.classes.map((c) => [c.key, c]));
  const byShortcut = Object.fromEntries(
    data.classes.filter((c) => c.shortcut).map((c) => [c.shortcut.toLowerCase(), c.key])
  );
  const GROUP_ORDER = ["unidentified", ...data.review_classes];
  const DIFFERENTIAL = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "ig", "unidentified"];
  const PER_100 = ["erythroblast", "platelet"];
  const EXCLUDED = ["artefact", "smudge"];
  const SVG = "http://www.w3.org/2000/svg";

  const state = {
    field: 0, selected: null, hidden: new Set(), pending: Promise.resolve(), order: null, undo: [],
  };
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-") || k.startsWith("aria-") || k === "title" || k === "role" || k === "type")
        node.setAttribute(k, v);
      else node[k] = v;
    }
    node.append(...children);
    return node;
  }

  const legendKey = (cell) => (cell.kind === "WBC" ? cell.class : cell.kind);
  const colour = (cell) =>
    cell.kind === "WBC" ? style[cell.class].colour : data.kinds[cell.kind].colour;
  const name = (key) => (style[key] ? style[key].name : data.kinds[key].name);

  function banner(text, kind, action) {
    const box = $("banner");
    box.replaceChildren(text);
    box.className = `banner ${kind}`;
    if (action) box.append(" ", action);
    box.hidden = false;
  }

  // --- flags: each one that holds the result is acknowledged before sign-out ----------------
  const acknowledged = () => (data.review.acknowledged || {});
  const openFlags = () =>
    data.result.flags.filter((f) => f.severity !== "info" && !acknowledged()[f.code]);

  function acknowledgeControl(f) {
    const done = acknowledged()[f.code];
    if (done) {
      return el("span", { class: "ack-done", "data-ack": f.code,
        text: `✓ acknowledged by ${done.username}${done.reason ? `: ${done.reason}` : ""}` });
    }
    if (!data.can_review || f.severity === "info") return el("span");
    const needsReason = data.reason_required.includes(f.code);
    const reason = el("input", { type: "text", class: "ack-reason", maxLength: 4000,
      placeholder: needsReason ? "reason (required)" : "reason (optional)" });
    reason.setAttribute("aria-label", `Reason for acknowledging ${f.code}`);
    const button = el("button", { type: "button", class: "ack", "data-ack": f.code, text: "Acknowledge" });
    button.addEventListener("click", () => {
      state.pending = state.pending.then(async () => {
        try {
          const answer = await api("POST", `/api/cases/${data.id}/flags/${encodeURIComponent(f.code)}/acknowledge`,
            { version: data.version, reason: reason.value });
          data.review = answer.review;
          setVersion(answer.version);
          renderFlags();
          renderProgress();
          $("banner").hidden = true;
        } catch (failure) {
          if (failure.status === 409) conflict(failure.message);
          else banner(failure.message, "error");
        }
      });
    });
    return el("span", { class: "ack-form" }, reason, button);
  }

  function renderFlags() {
    const flags = data.result.flags;
    const holding = flags.filter((f) => f.severity !== "info");
    const list = flags.map((f) =>
      el("div", { class: `flag sev-${f.severity}`, "data-code": f.code },
        el("span", { class: "flag-code", text: f.code }),
        el("span", { class: "flag-text", text: f.text }),
        acknowledgeControl(f))
    );
    if (!holding.length) {
      list.unshift(el("div", { class: "flag flags-ok", text: "Every rule passes." }));
    }
    $("flags").replaceChildren(...list);
  }

  // --- counting progress and review stage ------------------------------------------------------
  function renderProgress() {
    const n = data.result.wbc_classified;
    const bar = $("count-progress");
    bar.max = data.min_wbc;
    bar.value = Math.min(n, data.min_wbc);
    const marks = [...new Set([data.min_wbc, 200])].sort((a, b) => a - b);
    $("progress-text").textContent =
      `${n} leukocytes classified: ` +
      marks.map((m) => (n >= m ? `${m} reached` : `${m - n} more to ${m}`)).join(" · ");
    bar.className = n >= data.min_wbc ? "enough" : "short";
    const open = openFlags().length;
    const stage = [];
    if (open) stage.push(`${open} flag${open > 1 ? "s" : ""} to acknowledge`);
    if (data.two_stage) {
      const done = data.review.technical_review;
      stage.push(done ? `technical review by ${done.username}` : "technical review pending");
    }
    $("review-stage").textContent = stage.join(" · ");
  }

  // --- fields and outlines -------------------------------------------------------------------
  function renderFieldTabs() {
    const tabs = data.result.fields.map((f) => {
      const n = cells.filter((c) => c.field === f.index && c.kind === "WBC").length;
      const button = el("button", {
        type: "button",
        role: "tab",
        "aria-selected": String(f.index === state.field),
        title: f.quality.passed ? `${n} leukocytes` : `failed quality control: ${f.quality.reasons.join(", ")}`,
        text: `Field ${f.index + 1}`,
        class: f.quality.passed ? "" : "qc-failed",
      });
      button.addEventListener("click", () => showField(f.index));
      return button;
    });
    $("field-tabs").replaceChildren(...tabs);
  }

  // Outlines are loaded per field: the page carries every cell, but not every outline.
  async function loadOutlines(index) {
    if (!cells.some((c) => c.field === index && !c.outline)) return;
    const answer = await api("GET", `/api/cases/${data.id}/fields/${index}/cells`);
    for (const cell of answer.cells) cells[cell.id].outline = cell.outline;
  }

  async function showField(index) {
    const field = data.result.fields[index];
    if (!field) return;
    state.field = index;
    renderFieldTabs();
    $("field-image").src = `/api/cases/${data.id}/fields/${index}.png`;
    await loadOutlines(index);
    if (state.field !== index) return; // another field was chosen meanwhile
    const overlay = $("overlay");
    overlay.setAttribute("viewBox", `0 0 ${field.width} ${field.height}`);
    const here = cells.filter((c) => c.field === index);
    overlay.replaceChildren(
      ...here.map((cell) => {
        const polygon = document.createElementNS(SVG, "polygon");
        polygon.setAttribute("points", cell.outline.map((p) => p.join(",")).join(" "));
        polygon.dataset.id = cell.id;
        const title = document.createElementNS(SVG, "title");
        title.textContent = `#${cell.id} ${name(legendKey(cell))}`;
        polygon.append(title);
        if (cell.kind === "WBC") polygon.addEventListener("click", () => select(cell.id));
        paintPolygon(polygon, cell);
        return polygon;
      }),
      ...here.filter((cell) => cell.kind !== "RBC").map((cell) => {
        const label = document.createElementNS(SVG, "text");
        label.setAttribute("x", (cell.box[0] + cell.box[2]) / 2);
        label.setAttribute("y", Math.max(cell.box[1] - 3, 12));
        label.setAttribute("text-anchor", "middle");
        label.dataset.id = cell.id;
        paintLetter(label, cell);
        return label;
      })
    );
  }

  const letter = (cell) =>
    cell.kind === "WBC" ? style[cell.class].letter : data.kinds[cell.kind].letter;

  function paintLetter(label, cell) {
    label.textContent = letter(cell);
    label.setAttribute("fill", colour(cell));
    label.setAttribute("class", `letter${state.hidden.has(legendKey(cell)) ? " off" : ""}`);
  }

  function paintPolygon(polygon, cell) {
    polygon.setAttribute("stroke", colour(cell));
    polygon.setAttribute(
      "class",
      [
        cell.kind === "WBC" ? "wbc" : cell.kind.toLowerCase(),
        cell.kind === "WBC" ? cell.class : "",
        state.hidden.has(legendKey(cell)) ? "off" : "",
        state.selected === cell.id ? "selected" : "",
      ].join(" ")
    );
  }

  function repaintOverlay() {
    for (const polygon of $("overlay").querySelectorAll("polygon")) {
      paintPolygon(polygon, cells[Number(polygon.dataset.id)]);
    }
    for (const label of $("overlay").querySelectorAll("text")) {
      paintLetter(label, cells[Number(label.dataset.id)]);
    }
  }

  function renderLegend() {
    const counts = {};
    for (const cell of cells) counts[legendKey(cell)] = (counts[legendKey(cell)] || 0) + 1;
    const keys = [...GROUP_ORDER, "RBC", "PLT"].filter((k) => counts[k]);
    $("legend").replaceChildren(
      ...keys.map((key) => {
        const box = el("input", { type: "checkbox", checked: !state.hidden.has(key) });
        box.dataset.class = key;
        box.addEventListener("change", () => {
          if (box.checked) state.hidden.delete(key);
          else state.hidden.add(key);
          repaintOverlay();
        });
        const swatch = el("span", { class: "swatch" });
        swatch.style.borderColor = style[key] ? style[key].colour : data.kinds[key].colour;
        return el("label", {}, box, swatch, name(key), el("span", { class: "n", text: counts[key] }));
      })
    );
  }

  // --- differential --------------------------------------------------------------------------
  // The values are those the LIS gets (rounded, with the patient's interval and H/L flag),
  // as the server worked them out: nothing is recounted or judged here.
  function renderDifferential(changed = new Set()) {
    const r = data.result;
    const reported = Object.fromEntries(data.values.map((v) => [v.key, v]));
    const row = (key, count, unit) => {
      const swatch = el("span", { class: "swatch" });
      swatch.style.borderColor = style[key].colour;
      const value = reported[style[key].result_key];
      const shown = value ? `${value.value.toFixed(1)}${unit}` : "—";
      const range = value && (value.reference_low !== null || value.reference_high !== null)
        ? `${value.reference_low ?? ""}–${value.reference_high ?? ""}` : "";
      const flag = value && ["H", "L"].includes(value.abnormal_flag) ? `abn-${value.abnormal_flag}` : "";
      return el("tr", { class: changed.has(key) ? "changed" : "", "data-class": key },
        el("td", {}, swatch, style[key].name),
        el("td", { class: "num", text: count ?? 0 }),
        el("td", { class: `num ${flag}`, text: shown }),
        el("td", { class: "num muted", text: range }));
    };
    const previous = data.previous ? data.previous.differential : null;
    const before = (key) => {
      if (!previous || previous[key] === undefined) return el("td", { class: "num muted" });
      return el("td", { class: "num muted previous", text: previous[key].toFixed(1) });
    };
    const withPrevious = (tr, key) => { tr.append(before(key)); return tr; };
    const plain = (label, key, digits, unit) => {
      const value = reported[key];
      if (!value) return null;
      const range = value.reference_low !== null || value.reference_high !== null
        ? `${value.reference_low ?? ""}–${value.reference_high ?? ""}` : "";
      const flag = ["H", "L"].includes(value.abnormal_flag) ? `abn-${value.abnormal_flag}` : "";
      return el("tr", { "data-key": key },
        el("td", { text: label }), el("td"),
        el("td", { class: `num ${flag}`, text: `${value.value.toFixed(digits)}${unit}` }),
        el("td", { class: "num muted", text: range }), el("td"));
    };
    const absolute = DIFFERENTIAL.filter((k) => reported[`${k}_abs`]).concat(
      PER_100.filter((k) => reported[`${k}_abs`]));
    const group = (text) => el("tr", { class: "group" }, el("td", { colSpan: 5, text }));
    const rows = [
      group("Leukocytes, % of classified"),
      ...DIFFERENTIAL.map((k) => withPrevious(row(k, r.class_counts[k], " %"), k)),
      el("tr", { class: "sum" },
        el("td", { text: "Leukocytes classified" }),
        el("td", { class: "num", text: r.wbc_classified, id: "wbc-total" }),
        el("td", { class: "num", text: r.wbc_classified ? "100 %" : "—" }),
        el("td"), el("td")),
      group("Per 100 leukocytes"),
      ...PER_100.map((k) => withPrevious(row(k, r.class_counts[k], ""), k)),
      group("Not counted"),
      ...EXCLUDED.map((k) => withPrevious(row(k, (r.excluded_counts || {})[k], ""), k)),
      ...(absolute.length ? [group("Absolute, ×10⁹/L (analyser WBC count)")] : []),
      ...absolute.map((k) => plain(style[k].name, `${k}_abs`, 2, "")),
      group("Platelets on the smear"),
      plain("Per analysed field", "plt_per_field", 1, ""),
      plain("Estimate, ×10⁹/L", "plt_estimate", 0, ""),
    ].filter(Boolean);
    $("differential").tBodies[0].replaceChildren(...rows);
    const counts = r.counts || {};
    $("wbc-classified").textContent =
      `Detected: ${counts.WBC ?? 0} WBC · ${counts.RBC ?? 0} RBC · ${counts.PLT ?? 0} PLT`;
  }

  // --- gallery -------------------------------------------------------------------------------
  function bars(cell) {
    const box = el("div", { class: "bars", "aria-hidden": "true" });
    const probabilities = cell.probabilities || {};
    const top = Math.max(...Object.values(probabilities), 0);
    // In the order of the keys 1-8 (JSON objects may arrive in any key order).
    const ordered = data.review_classes.filter((k) => k in probabilities).map((k) => [k, probabilities[k]]);
    for (const [key, p] of ordered) {
      const bar = el("span");
      bar.style.height = `${Math.max(p * 100, 3)}%`;
      bar.style.background = style[key] ? style[key].colour : "#999";
      if (p === top) bar.style.opacity = "1";
      box.append(bar);
    }
    box.title = Object.entries(probabilities)
      .map(([k, p]) => `${name(k)} ${(p * 100).toFixed(0)} %`)
      .join("\n");
    return box;
  }

  function tile(cell) {
    const button = el("button", {
      type: "button",
      class: `tile${state.selected === cell.id ? " selected" : ""}`,
      "data-id": cell.id,
      "data-class": cell.class,
      title: `#${cell.id}: ${name(cell.class)}`,
    });
    const image = el("img", { alt: `cell ${cell.id}`, loading: "lazy", width: 168, height: 168 });
    image.src = `/api/cases/${data.id}/cells/${cell.id}.png`;
    button.append(el("span", { class: "thumb" }, image),
      el("span", { class: "tile-id", text: `#${cell.id}` }), bars(cell));
    if (cell.original_class && cell.original_class !== cell.class) {
      button.append(el("span", { class: "was", text: `was ${style[cell.original_class].name}` }));
    }
    button.addEventListener("click", () => select(cell.id));
    return button;
  }

  function renderGallery() {
    const leukocytes = cells.filter((c) => c.kind === "WBC");
    const groups = GROUP_ORDER.map((key) => [key, leukocytes.filter((c) => c.class === key)])
      .filter(([, members]) => members.length);
    if (!groups.length) {
      $("gallery").replaceChildren(el("p", { class: "none", text: "No leukocytes were detected in this case." }));
      return;
    }
    $("gallery").replaceChildren(
      ...groups.map(([key, members]) => {
        const swatch = el("span", { class: "swatch" });
        swatch.style.borderColor = style[key].colour;
        return el("section", { class: "group", "data-class": key },
          el("h3", {}, swatch, style[key].name, el("span", { class: "n", text: `${members.length}` })),
          el("div", { class: "tiles" }, ...members.map(tile)));
      })
    );
  }

  // --- inspector -----------------------------------------------------------------------------
  async function loadSaliency(cell) {
    const image = $("inspector-saliency");
    const caption = $("saliency-caption");
    image.removeAttribute("src");
    caption.textContent = "Working out what the classifier looked at…";
    try {
      const response = await fetch(`/api/cases/${data.id}/cells/${cell.id}/saliency.png`, {
        credentials: "same-origin",
      });
      if (!response.ok) throw new Error(`saliency unavailable (${response.status})`);
      const blob = await response.blob();
      if (state.selected !== cell.id) return;
      image.src = URL.createObjectURL(blob);
      const top = response.headers.get("X-Saliency-Class");
      const p = Number(response.headers.get("X-Saliency-Probability"));
      caption.textContent = `What the answer “${name(top)}” (${(p * 100).toFixed(0)} %) rests on`;
    } catch (failure) {
      caption.textContent = failure.message;
    }
  }

  function renderInspector() {
    const cell = state.selected === null ? null : cells[state.selected];
    $("inspector-empty").hidden = cell !== null;
    $("inspector-body").hidden = cell === null;
    if (!cell) {
      $("inspector-title").textContent = "Selected cell";
      $("inspector-sub").textContent = "";
      return;
    }
    $("inspector-title").textContent = `Cell #${cell.id}: ${name(cell.class)}`;
    $("inspector-sub").textContent =
      `field ${cell.field + 1}` +
      (cell.original_class && cell.original_class !== cell.class
        ? ` · classifier said ${name(cell.original_class)}` : "");
    const probabilities = Object.entries(cell.probabilities || {}).sort((a, b) => b[1] - a[1]);
    $("inspector-probabilities").replaceChildren(
      ...probabilities.flatMap(([key, p], i) => {
        const fill = el("span");
        fill.style.width = `${(p * 100).toFixed(1)}%`;
        fill.style.background = style[key] ? style[key].colour : "#999";
        return [
          el("span", { class: i === 0 ? "top" : "", text: name(key) }),
          el("span", { class: "bar" }, fill),
          el("span", { class: "num", text: `${(p * 100).toFixed(1)} %` }),
        ];
      })
    );
    $("class-menu").replaceChildren(
      ...data.review_classes.map((key) => {
        const button = el("button", {
          type: "button",
          role: "menuitemradio",
          "aria-checked": String(cell.class === key),
          "data-class": key,
          disabled: !data.can_review,
          title: data.can_review ? `Reclassify as ${style[key].name}` : "Your role cannot change cells",
        });
        const swatch = el("span", { class: "swatch" });
        swatch.style.borderColor = style[key].colour;
        button.append(el("span", { class: "key", text: style[key].shortcut }), swatch, style[key].name);
        button.addEventListener("click", () => reclassify(cell.id, key));
        return button;
      })
    );
  }

  function select(id) {
    const cell = cells[id];
    if (!cell || cell.kind !== "WBC") return;
    const changedCell = state.selected !== id;
    state.selected = id;
    if (cell.field !== state.field) showField(cell.field);
    for (const t of document.querySelectorAll(".tile")) {
      t.classList.toggle("selected", Number(t.dataset.id) === id);
    }
    repaintOverlay();
    renderInspector();
    const chosen = document.querySelector(`.tile[data-id="${id}"]`);
    chosen?.scrollIntoView({ block: "nearest" });
    $("inspector-crop").src = `/api/cases/${data.id}/cells/${id}.png`;
    if (changedCell) loadSaliency(cell);
  }

  function move(step) {
    // The order of the gallery as first shown: a reclassified cell moves to another group,
    // but the way through the cells stays the same.
    const ids = state.order;
    if (!ids.length) return;
    const at = ids.indexOf(state.selected);
    const next = at < 0 ? (step > 0 ? 0 : ids.length - 1) : Math.min(Math.max(at + step, 0), ids.length - 1);
    select(ids[next]);
  }

  // --- changes -------------------------------------------------------------------------------
  function updateStatus(status) {
    data.status = status;
    const badge = $("case-status");
    badge.textContent = status;
    badge.className = `badge status-${status}`;
    const signOut = $("sign-out");
    if (signOut) {
      signOut.disabled = status !== "review";
      signOut.title = status === "review" ? "" : "Change a cell to correct a released result";
    }
  }

  function setVersion(version) {
    data.version = version;
    $("case-version").textContent = version;
  }

  function conflict(message) {
    const reload = el("button", { type: "button", text: "Reload case" });
    reload.addEventListener("click", () => window.location.reload());
    banner(message, "error", reload);
  }

  function reclassify(id, key, undoing = false) {
    if (!data.can_review || cells[id].class === key) return state.pending;
    const from = cells[id].class;
    state.pending = state.pending.then(async () => {
      const before = { ...data.result.class_counts };
      try {
        const answer = await api("PATCH", `/api/cases/${data.id}/cells/${id}`, {
          class: key,
          version: data.version,
        });
        cells[id] = { ...cells[id], ...answer.cell };
        for (const k of ["counts", "class_counts", "excluded_counts", "differential", "wbc_classified", "flags"]) {
          data.result[k] = answer[k];
        }
        data.values = answer.values;
        if (!undoing) state.undo.push({ id, from });
        if (data.review.technical_review) {
          delete data.review.technical_review;  // the server undid it: the result changed
        }
        setVersion(answer.version);
        updateStatus(answer.status);
        const changed = new Set(
          Object.keys(answer.class_counts).filter((k) => answer.class_counts[k] !== before[k])
        );
        changed.add(key);
        renderDifferential(changed);
        renderFlags();
        renderProgress();
        renderLegend();
        renderGallery();
        repaintOverlay();
        renderInspector();
        $("banner").hidden = true;
      } catch (failure) {
        if (failure.status === 409) conflict(failure.message);
        else banner(failure.message, "error");
      }
    });
    return state.pending;
  }

  function openSignOut() {
    const start = $("sign-out");
    if (!start || start.disabled) return;
    const open = openFlags();
    if (open.length) {
      banner(`Acknowledge every review flag before sign-out: ${open.map((f) => f.code).join(", ")}`, "error");
      return;
    }
    if (data.two_stage && !data.review.technical_review) {
      banner("Two-stage review: a technologist completes the technical review first.", "error");
      return;
    }
    const below = data.result.wbc_classified < data.min_wbc;
    $("override-area").hidden = !below;
    $("override-label").textContent =
      `Override: only ${data.result.wbc_classified} of ${data.min_wbc} leukocytes. Why release it?`;
    $("sign-out-question").textContent = data.final_sent
      ? "Release a corrected result (C) to the LIS?"
      : "Release the final result (F) to the LIS?";
    start.hidden = true;
    $("sign-out-confirm").hidden = false;
    (below ? $("override-text") : $("sign-out-yes")).focus();
  }

  function setUpTechnicalReview() {
    const button = $("technical-review");
    if (!button) return;
    const refresh = () => {
      const done = data.review.technical_review;
      button.disabled = Boolean(done) || data.status !== "review";
      button.textContent = done ? `Technical review done (${done.username})` : "Complete technical review";
    };
    refresh();
    button.addEventListener("click", () => {
      state.pending = state.pending.then(async () => {
        try {
          const answer = await api("POST", `/api/cases/${data.id}/technical-review`, { version: data.version });
          data.review = answer.review;
          setVersion(answer.version);
          refresh();
          renderProgress();
          banner("Technical review complete: the case waits for a pathologist's sign-out.", "ok");
        } catch (failure) {
          if (failure.status === 409 && /changed/.test(failure.message)) conflict(failure.message);
          else banner(failure.message, "error");
        }
      });
    });
  }

  function setUpAddCaptures() {
    const button = $("add-captures");
    if (!button) return;
    button.addEventListener("click", () => {
      state.pending = state.pending.then(async () => {
        try {
          await api("POST", `/api/cases/${data.id}/add-captures`, { version: data.version });
          button.disabled = true;
          banner("Counting the new captures in; the case reloads when the analysis is done.", "ok");
          for (;;) {
            await new Promise((resolve) => setTimeout(resolve, 1000));
            const now = await api("GET", `/api/cases/${data.id}`);
            if (now.status !== "queued") break;
          }
          window.location.reload();
        } catch (failure) {
          if (failure.status === 409) conflict(failure.message);
          else banner(failure.message, "error");
        }
      });
    });
  }

  function setUpSignOut() {
    const start = $("sign-out");
    if (!start) return;
    const confirmBox = $("sign-out-confirm");
    updateStatus(data.status);
    start.addEventListener("click", openSignOut);
    $("sign-out-no").addEventListener("click", () => {
      confirmBox.hidden = true;
      start.hidden = false;
    });
    $("sign-out-yes").addEventListener("click", () => {
      state.pending = state.pending.then(async () => {
        try {
          const done = await api("POST", `/api/cases/${data.id}/signout`,
            { version: data.version, override: $("override-text").value });
          setVersion(done.version);
          updateStatus(done.status);
          data.final_sent = true;
          const kind = done.result_status === "C" ? "Corrected" : "Final";
          banner(`${kind} result (${done.result_status}) released to the LIS as message ${done.control_id}.`, "ok");
        } catch (failure) {
          if (failure.status === 409) conflict(failure.message);
          else banner(failure.message, "error");
        } finally {
          confirmBox.hidden = true;
          start.hidden = false;
        }
      });
    });
  }

  function setUpComments() {
    const form = $("comment-form");
    if (!form) return;
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const text = $("comment-text").value.trim();
      const canned = $("comment-canned") ? $("comment-canned").value : "";
      if (!text && !canned) return;
      try {
        const comment = await api("POST", `/api/cases/${data.id}/comments`,
          canned ? { text, canned } : { text });
        if ($("comment-canned")) $("comment-canned").value = "";
        const when = localTime(comment.created_at);
        $("comment-list").append(
          el("li", {},
            el("div", { class: "comment-meta" },
              el("strong", { text: comment.username }), " ", el("span", { class: "muted", text: when })),
            el("div", { class: "comment-text", text: comment.text }))
        );
        $("comment-text").value = "";
      } catch (failure) {
        banner(failure.message, "error");
      }
    });
  }

  /** A time as the laboratory reads it: local, with the zone named. */
  function localTime(iso) {
    const moment = new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(iso) ? iso : `${iso}Z`);
    return moment.toLocaleString(undefined, {
      year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
      timeZoneName: "short",
    });
  }

  function undo() {
    const last = state.undo.pop();
    if (!last) {
      banner("Nothing to undo.", "error");
      return;
    }
    select(last.id);
    reclassify(last.id, last.from, true);
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest("input, textarea, select")) return;
    const key = event.key.toLowerCase();
    if (key === "n" && $("next-case")) window.location.assign($("next-case").href);
    else if (key === "u") undo();
    else if (key === "f") openSignOut();
    else if (key === "arrowright" || key === "arrowdown") move(1);
    else if (key === "arrowleft" || key === "arrowup") move(-1);
    else if (key === "escape") {
      state.selected = null;
      renderInspector();
      renderGallery();
      repaintOverlay();
    } else if (byShortcut[key] && state.selected !== null) reclassify(state.selected, byShortcut[key]);
    else return;
    event.preventDefault();
  });

  renderFlags();
  const firstWithCells = data.result.fields.find((f) => cells.some((c) => c.field === f.index));
  if (data.result.fields.length) showField(firstWithCells ? firstWithCells.index : 0);
  renderLegend();
  renderDifferential();
  renderGallery();
  state.order = [...document.querySelectorAll(".tile")].map((t) => Number(t.dataset.id));
  renderInspector();
  renderProgress();
  setUpSignOut();
  setUpTechnicalReview();
  setUpAddCaptures();
  setUpComments();
})();
