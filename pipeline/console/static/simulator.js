// Identity-rules simulator: pasted records stitched by the pipeline's own code under today's rules and under
// changed ones (priorities, unique namespaces, graph limit), side by side. Nothing is stored.
import { api } from "./api.js";
import { current, go } from "./console.js";
import { field, h, problemView, table } from "./dom.js";

const EXAMPLE = [
  { id: "r1", kind: "profile", identities: { CRMID: "A-1", Email: "ann@example.com" } },
  { id: "r2", identities: { ECID: "shared-cookie", Email: "ann@example.com" } },
  { id: "r3", kind: "profile", identities: { CRMID: "B-2", ECID: "shared-cookie" } },
].map((r) => JSON.stringify(r)).join("\n");

export async function renderSimulator(main, { params, generation }) {
  // the state in the URL: the records and the changed rules (JSON), so a simulation can be shared or reloaded
  const records = h("textarea", { id: "sim-records", rows: 8, spellcheck: "false",
    "aria-describedby": "sim-records-help" });
  records.value = params.has("records") ? params.get("records") : EXAMPLE;
  let changes = {};
  try { changes = JSON.parse(params.get("rules") || "{}"); } catch { changes = {}; }
  const rulesBox = h("div", { id: "sim-rules" }, h("p", { class: "muted" }, "Loading today's rules…"));
  const out = h("div", { id: "sim-result", "aria-live": "polite" });
  const form = h("form", { "aria-label": "Simulate identity rules" },
    field("Records (JSON lines)", records),
    h("p", { id: "sim-records-help", class: "muted" },
      '{"id": "r1", "kind": "event" or "profile", "identities": {"Email": "a@b.c", "ECID": ["c1"]}}'),
    rulesBox, h("button", { type: "submit", id: "simulate" }, "Simulate"));
  main.append(h("section", {}, h("h2", { tabindex: "-1", id: "page-title" }, "Identity rules simulator"),
    h("p", { class: "muted" }, "The records are stitched by the pipeline's own stitching code, under today's rules ",
      "and under the rules below; nothing is stored."), form), out);
  records.focus();

  const run = async (rules) => {
    const body = { records: records.value, rules };
    const r = await api("POST", "/identity/simulate", { body });
    if (current() !== generation) return null;
    return r;
  };
  let today;
  try {
    today = await run({});  // today's rules come with any answer
  } catch (err) {
    rulesBox.replaceChildren(problemView(err));
  }
  if (!today) return;
  const inputs = {};
  const rows = today.rules.namespaces.map((ns) => {
    const priority = h("input", { type: "number", min: 0, max: 1000, id: `sim-priority-${ns.name}`,
      value: (changes.priorities || {})[ns.name] ?? ns.priority, "aria-label": `${ns.name} priority` });
    const unique = h("input", { type: "checkbox", id: `sim-unique-${ns.name}`, "aria-label": `${ns.name} unique`,
      checked: changes.unique ? changes.unique.includes(ns.name) : ns.unique });
    inputs[ns.name] = { priority, unique, was: ns };
    return [ns.name, ns.kind, `${ns.priority}${ns.unique ? ", unique" : ""}`, priority, unique];
  });
  const limit = h("input", { type: "number", min: 1, max: 10000, id: "sim-limit",
    value: changes.max_identities_per_graph ?? today.rules.max_identities_per_graph });
  rulesBox.replaceChildren(h("h3", {}, "Rules"), table(["Namespace", "Kind", "Today", "Priority", "Unique"], rows),
    field("Graph limit (identities per profile)", limit));

  const proposed = () => {
    const rules = { priorities: {}, unique: [] };
    for (const [name, i] of Object.entries(inputs)) {
      const p = Number(i.priority.value);
      if (p !== i.was.priority) rules.priorities[name] = p;
      if (i.unique.checked) rules.unique.push(name);
    }
    const n = Number(limit.value);
    if (n !== today.rules.max_identities_per_graph) rules.max_identities_per_graph = n;
    return rules;
  };
  const show = async () => {
    const rules = proposed();
    go("simulator", { records: records.value, rules: JSON.stringify(rules) }, { render: false });
    out.replaceChildren(h("p", { class: "muted" }, "Simulating…"));
    try {
      const r = await run(rules);
      if (r) out.replaceChildren(resultView(r));
    } catch (err) {
      out.replaceChildren(problemView(err));
    }
  };
  form.addEventListener("submit", (e) => { e.preventDefault(); show(); });
  if (params.has("rules")) show();
}

function outcomeView(title, id, o) {
  const n = o.profiles.length;
  return h("section", { id }, h("h3", {}, `${title}: ${n} profile${n === 1 ? "" : "s"}`,
    o.merged ? ` (${o.merged} merged)` : ""),
  o.profiles.map((p) => h("div", { class: "sim-profile" }, h("h4", { class: "mono" }, p.profile_id),
    h("p", {}, Object.entries(p.identities).filter(([ns]) => ns !== "EMAIL_LC_SHA256")
      .map(([ns, ids]) => h("span", { class: "tag" }, `${ns}: ${ids.join(", ")}`)),
    h("span", { class: "muted" }, ` ${p.events} events`)))),
  o.dropped.length ? h("ul", { class: "errors" }, o.dropped.map((d) => h("li", {}, d))) : null);
}

function resultView(r) {
  return h("div", { class: "grid" }, outcomeView("Today's rules", "sim-current", r.current),
    outcomeView("Proposed rules", "sim-proposed", r.proposed));
}
