// Audiences: the list with sizes and evaluation kinds, and an editor that checks a query as it is typed,
// previews its size over the stored profiles and saves it (the worker reloads its definitions).
import { api } from "./api.js";
import { current, go } from "./console.js";
import { field, h, problemView, s, table, when } from "./dom.js";

const CHECK_DELAY_MS = 200;
const RELOAD_WAIT_MS = 30000;

export async function renderAudiences(main, ctx) {
  if (ctx.rest[0] === "edit") return renderEditor(main, ctx);
  const out = h("div", { id: "audience-list", "aria-live": "polite" }, h("p", { class: "muted" }, "Loading…"));
  main.append(h("section", {}, h("h2", { tabindex: "-1", id: "page-title" }, "Audiences"),
    h("p", {}, h("a", { href: "#/audiences/edit", id: "new-audience" }, "New audience")), out));
  main.querySelector("#page-title").focus();
  let audiences;
  try {
    audiences = await api("GET", "/audiences");
  } catch (err) {
    out.replaceChildren(problemView(err));
    return;
  }
  const sizes = await Promise.all(audiences.map((a) => api("GET", `/audiences/${encodeURIComponent(a.id)}`)
    .then((x) => String(x.size), (err) => err.status === 503 ? "not counted now" : err)));
  if (current() !== ctx.generation) return;
  const problems = sizes.filter((x) => typeof x !== "string");
  out.replaceChildren(...problems.slice(0, 1).map(problemView), table(
    ["Audience", "Name", "Size", "Evaluation", "Why", "Version"],
    audiences.map((a, i) => [
      h("a", { href: `#/audiences/edit?id=${encodeURIComponent(a.id)}` }, a.id), a.name || "",
      h("span", { class: "size", "data-audience": a.id }, typeof sizes[i] === "string" ? sizes[i] : "error"),
      kinds(a), h("span", { class: "muted" }, a.reason), String(a.version)])));
}

function kinds(a) {
  return ["streaming", "batch", "edge"].map((k) => h("span", { class: a[k] ? "tag" : "tag off" }, k));
}

async function renderEditor(main, { params, generation }) {
  const id = params.get("id") || "";
  let existing = null;
  const idInput = h("input", { id: "audience-id", value: id, required: true, spellcheck: "false" });
  const nameInput = h("input", { id: "audience-name", size: 30 });
  const query = h("textarea", { id: "audience-query", rows: 5, spellcheck: "false",
    "aria-describedby": "query-check" });
  const check = h("div", { id: "query-check", role: "status", "aria-live": "polite" });
  const preview = h("div", { id: "query-preview", "aria-live": "polite" });
  const saved = h("div", { id: "save-result", "aria-live": "polite" });
  const previewButton = h("button", { type: "button", class: "secondary", id: "preview" }, "Preview size");
  const form = h("form", { "aria-label": "Audience definition" },
    h("div", { class: "inline" }, field("Audience id", idInput), field("Name", nameInput)),
    field("Query", query), check,
    h("div", { class: "inline" }, previewButton, h("button", { type: "submit", id: "save" }, "Save")),
    preview, saved);
  const flows = h("section", { id: "audience-flows", "aria-live": "polite" });
  main.append(h("section", {}, h("h2", { tabindex: "-1", id: "page-title" }, id ? `Audience ${id}` : "New audience"),
    h("p", {}, h("a", { href: "#/audiences" }, "All audiences")), form), flows);
  if (id) {
    api("GET", `/audiences/${encodeURIComponent(id)}`).then(
      (a) => { if (current() === generation) flows.replaceChildren(...flowView(a)); },
      (err) => { if (current() === generation && err.status !== 404) flows.replaceChildren(problemView(err)); });
    try {
      existing = (await api("GET", "/audiences")).find((a) => a.id === id) || null;
    } catch (err) {
      check.replaceChildren(problemView(err));
    }
  }
  if (current() !== generation) return;
  nameInput.value = existing ? existing.name || "" : "";
  query.value = params.has("q") ? params.get("q") : existing ? existing.query || "" : "";

  let timer = null;
  let asked = 0;
  const validate = async (withPreview) => {
    const n = ++asked;
    const body = { id: idInput.value.trim(), query: query.value, preview: withPreview };
    try {
      const r = await api("POST", "/audiences/validate", { body });
      if (n !== asked || current() !== generation) return null;  // a later keystroke asked again
      check.replaceChildren(checkView(r));
      if (withPreview && r.preview) preview.replaceChildren(previewView(r.preview));
      return r;
    } catch (err) {
      if (n === asked) check.replaceChildren(problemView(err));
      return null;
    }
  };
  const changed = () => {
    // the draft lives in the URL (replaced, not pushed: one history entry per audience, not per keystroke)
    go("audiences/edit", { id: idInput.value.trim(), q: query.value }, { render: false });
    preview.replaceChildren();
    clearTimeout(timer);
    timer = setTimeout(() => validate(false), CHECK_DELAY_MS);
  };
  query.addEventListener("input", changed);
  idInput.addEventListener("input", changed);
  previewButton.addEventListener("click", () => {
    preview.replaceChildren(h("p", { class: "muted" }, "Counting…"));
    validate(true);
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    saved.replaceChildren(h("p", { class: "muted" }, "Saving…"));
    const audienceId = idInput.value.trim();
    let r;
    try {
      r = await api("PUT", `/audiences/${encodeURIComponent(audienceId)}`,
        { body: { query: query.value, name: nameInput.value.trim() } });
    } catch (err) {
      saved.replaceChildren(problemView(err));
      return;
    }
    saved.replaceChildren(h("p", { id: "save-state" }, `Saved ${r.id} as version ${r.version}; waiting for the `,
      "worker to reload its definitions…"));
    // the worker reloads segments.yaml within seconds: wait until it evaluates the saved version
    const deadline = Date.now() + RELOAD_WAIT_MS;
    while (Date.now() < deadline && current() === generation) {
      try {
        const live = (await api("GET", "/audiences")).find((a) => a.id === r.id);
        if (live && live.version === r.version && live.query === r.query) {
          saved.replaceChildren(h("p", { id: "save-state", class: "ok" },
            `Saved ${r.id} as version ${r.version}: live in the pipeline`));
          return;
        }
      } catch (err) {
        saved.replaceChildren(problemView(err));
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    if (current() === generation) {
      saved.replaceChildren(problemView({ problem: { title: "Not reloaded",
        detail: `the worker still evaluates an older version of ${r.id}; see its log` } }));
    }
  });
  (id ? query : idInput).focus();
  if (query.value) validate(false);
}

function checkView(r) {
  if (!r.valid) {
    return h("div", { class: "invalid" }, h("strong", {}, "Not valid"),
      h("ul", { class: "errors" }, r.errors.map((e) => h("li", {},
        e.line !== null && e.line !== undefined ? `line ${e.line}, column ${e.column}: ${e.message}` : e.message))));
  }
  return h("div", { class: "valid" }, h("strong", { class: "ok" }, "Valid"), " ",
    ["streaming", "batch", "edge"].map((k) => h("span", { class: r[k] ? "tag" : "tag off" }, k)),
    h("p", { class: "muted" }, r.reason));
}

function previewView(p) {
  return h("p", { id: "preview-size" }, `${p.size} of ${p.scanned} stored profiles`,
    p.complete ? "" : " (partial: not every partition or profile was read)",
    p.sample.length ? `; for example ${p.sample.join(", ")}` : "", ` (${p.ms} ms)`);
}

const CHART_MINUTES = 60;

// Entries (up) and exits (down) per minute over the last hour, as an inline SVG bar chart.
function flowView(a) {
  const now = Math.floor(Date.now() / 60000) * 60000;
  const byMinute = new Map((a.flows || []).map((f) => [f.minute_ms, f]));
  const minutes = Array.from({ length: CHART_MINUTES }, (_, i) => now - (CHART_MINUTES - 1 - i) * 60000);
  const entries = minutes.reduce((n, m) => n + (byMinute.get(m)?.entries || 0), 0);
  const exits = minutes.reduce((n, m) => n + (byMinute.get(m)?.exits || 0), 0);
  const top = Math.max(1, ...minutes.map((m) => Math.max(byMinute.get(m)?.entries || 0, byMinute.get(m)?.exits || 0)));
  const width = 600, half = 50, bar = width / CHART_MINUTES;
  const label = `Entries and exits in the last ${CHART_MINUTES} minutes: ${entries} entries, ${exits} exits`;
  const chart = s("svg", { class: "flows", width, height: 2 * half + 20, viewBox: `0 0 ${width} ${2 * half + 20}`,
    role: "img", "aria-label": label }, s("title", {}, label),
  s("line", { x1: 0, x2: width, y1: half, y2: half, stroke: "#9aa4ae" }));
  minutes.forEach((m, i) => {
    const f = byMinute.get(m);
    if (!f) return;
    const up = (f.entries / top) * (half - 4), down = (f.exits / top) * (half - 4);
    if (f.entries) chart.append(s("rect", { x: i * bar + 1, y: half - up, width: bar - 2, height: up, fill: "#0a7a35" },
      s("title", {}, `${when(m)}: ${f.entries} entries`)));
    if (f.exits) chart.append(s("rect", { x: i * bar + 1, y: half, width: bar - 2, height: down, fill: "#b00020" },
      s("title", {}, `${when(m)}: ${f.exits} exits`)));
  });
  chart.append(s("text", { x: 0, y: 2 * half + 16 }, `${CHART_MINUTES} min ago`),
    s("text", { x: width, y: 2 * half + 16, "text-anchor": "end" }, "now"));
  return [h("h3", {}, `Size ${a.size}; entries and exits, last hour`), chart,
    h("p", { class: "muted", id: "flow-totals" }, `${entries} entries, ${exits} exits (counted by the workers since `,
      "they started)")];
}
