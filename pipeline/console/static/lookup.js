// Customer lookup: one profile by any identity, with its identities, graph, attributes, memberships and events.
import { api } from "./api.js";
import { go } from "./console.js";
import { field, h, problemView, table, when } from "./dom.js";
import { identityGraph } from "./graph.js";

const NAMESPACES = ["Email", "Phone", "CRMID", "ECID", "GAID", "IDFA", "EMAIL_LC_SHA256"];

export async function renderLookup(main, { params }) {
  const namespace = params.get("namespace") || "Email";
  const id = params.get("id") || "";
  const nsInput = h("input", { id: "lookup-namespace", name: "namespace", list: "namespaces", value: namespace,
    required: true });
  const idInput = h("input", { id: "lookup-id", name: "id", value: id, required: true, size: 34, spellcheck: "false" });
  const form = h("form", { class: "inline", role: "search", "aria-label": "Find a customer" },
    field("Namespace", nsInput), h("datalist", { id: "namespaces" }, NAMESPACES.map((n) => h("option", { value: n }))),
    field("Identity", idInput), h("button", { type: "submit" }, "Look up"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    go("lookup", { namespace: nsInput.value.trim(), id: idInput.value.trim() });
  });
  const out = h("div", { id: "lookup-result", "aria-live": "polite" });
  main.append(h("section", {}, h("h2", { tabindex: "-1", id: "page-title" }, "Customer lookup"), form), out);
  if (!id) { idInput.focus(); return; }
  out.append(h("p", { class: "muted" }, "Looking up…"));
  try {
    const profile = await api("GET", "/profiles", { query: { namespace, id } });
    out.replaceChildren(...profileView(profile));
    performance.mark("cdp:lookup-rendered");
    document.getElementById("profile-title").focus();
    fillDestinations(out);  // after the first render: the destinations' health takes longer to read
  } catch (err) {
    out.replaceChildren(problemView(err));
    idInput.focus();
  }
}

function profileView(p) {
  const links = p.identity_links || {};
  const identities = h("section", { "aria-labelledby": "identities-title" },
    h("h3", { id: "identities-title" }, "Identities"),
    Object.keys(p.identities).map((ns) => h("div", { class: "namespace" }, h("h4", {}, ns),
      table(["Identity", "Linked", "Dataset"], p.identities[ns].map((i) => {
        const link = (links[ns] || {})[i] || {};
        return [h("span", { class: "mono" }, i), when(link.linked_ms),
          link.dataset ? link.dataset : h("span", { class: "muted" }, "not recorded")];
      })))));
  const policy = p.merge_policy ? h("p", { class: "muted", id: "merge-policy" }, `Merge policy: ${p.merge_policy.type}`,
    p.merge_policy.order ? ` (${p.merge_policy.order.join(" > ")})` : "", ": the source dataset shown won.") : null;
  const attributes = h("section", {}, h("h3", {}, "Attributes"), policy,
    table(["Attribute", "Value", "Source dataset", "Updated"], Object.entries(p.attributes).map(([k, a]) => [
      h("span", { class: "mono" }, k), String(a.value), a.dataset, when(a.ts_ms)])));
  const memberships = h("section", {}, h("h3", {}, "Audience memberships"),
    Object.keys(p.memberships).length
      ? table(["Audience", "Status", "Since", "Reason", "Version", "Delivered to", "Destinations (configured)"],
        Object.entries(p.memberships).map(([a, m]) => [
          h("a", { href: `#/audiences/edit?id=${encodeURIComponent(a)}` }, a), m.status, when(m.since_ms), reasonView(a, m),
          String(m.version), deliveredView(a, m),
          h("span", { class: "destinations muted", "data-audience": a }, "…")]))
      : h("p", { class: "muted" }, "in no audience"));
  const events = h("section", {}, h("h3", {}, `Recent events (${p.recent_events.length} of ${p.event_count})`),
    table(["Time", "Type", "Dataset", "Fields"], p.recent_events.map((e) => [when(e.ts_ms), e.event_type, e.dataset,
      h("span", { class: "mono" }, Object.entries(e.fields).map(([k, v]) => `${k}=${v}`).join(", "))])));
  return [
    h("section", {}, h("h2", { id: "profile-title", tabindex: "-1" }, `Profile ${p.profile_id}`),
      h("p", { class: "muted" }, `created ${when(p.created_ms)}`,
        p.next_deadline_ms ? `; next re-evaluation ${when(p.next_deadline_ms)}` : "")),
    h("div", { class: "grid" }, identities,
      h("section", {}, h("h3", {}, "Identity graph"), identityGraph(p))),
    attributes, memberships, events,
  ];
}

// The stored reason (decided when the membership changed) and, under it, the evidence the worker worked out for
// this lookup: the events with their days, the attributes with their source, the other audiences read.
function reasonView(audience, m) {
  const evidence = m.evidence || [];
  return h("div", {}, m.reason, evidence.length
    ? h("ul", { class: "evidence", "aria-label": `Why in ${audience}` }, evidence.map((line) => h("li", {}, line)))
    : null);
}

// What each destination acknowledged last of a membership (the runner's receipts), and when.
function deliveredView(audience, m) {
  const rows = m.destinations || [];
  if (!rows.length) return h("span", { class: "muted" }, "none acknowledged");
  return h("ul", { class: "delivered", "aria-label": `Destinations ${audience} reached` },
    rows.map((d) => h("li", {}, `${d.name}: ${d.status} `, when(d.delivered_ms))));
}

// Which destinations each membership is sent to, as destinations.yaml says (not a delivery record).
async function fillDestinations(out) {
  const cells = [...out.querySelectorAll("span.destinations")];
  if (!cells.length) return;
  let rows;
  try {
    rows = await api("GET", "/destinations");
  } catch (err) {
    const why = err.status === 403 ? "not shown: this key lacks destinations:read" : `not shown: ${err.message}`;
    for (const c of cells) c.textContent = why;
    return;
  }
  for (const c of cells) {
    const names = rows.filter((d) => d.audiences === null || d.audiences.includes(c.dataset.audience)).map((d) => d.name);
    c.textContent = names.join(", ") || "none";
    c.classList.remove("muted");
  }
}
