// Destinations: health per destination (lag, last delivery, errors, breaker, dead letters), a redrive button
// (destinations:redrive) and a file destination's last exports with their manifests.
import { api } from "./api.js";
import { current } from "./console.js";
import { h, problemView, table, when } from "./dom.js";

export async function renderDestinations(main, { generation }) {
  const out = h("div", { id: "destination-list", "aria-live": "polite" }, h("p", { class: "muted" }, "Loading…"));
  const note = h("div", { id: "redrive-result", "aria-live": "polite" });
  main.append(h("section", {}, h("h2", { tabindex: "-1", id: "page-title" }, "Destinations"), note, out));
  main.querySelector("#page-title").focus();
  const load = async () => {
    let rows;
    try {
      rows = await api("GET", "/destinations");
    } catch (err) {
      out.replaceChildren(problemView(err));
      return;
    }
    if (current() !== generation) return;
    out.replaceChildren(rows.length ? view(rows) : h("p", { class: "muted" }, "no destinations configured"));
  };
  const view = (rows) => h("div", {}, table(
    ["Destination", "Kind", "Runner", "Lag", "Last delivery", "Delivered", "Errors", "Breaker", "Dead letters", ""],
    rows.map((d) => [d.name, d.kind, d.runner, d.lag ?? "?", when(d.last_delivery_ms) || "never", d.delivered ?? "?",
      [...Object.entries(d.errors).map(([k, v]) => `${k}: ${v}`),
        ...(d.dead_lettered ? [`dead-lettered: ${d.dead_lettered}`] : [])].join(", ") || "none", d.breaker ?? "",
      h("span", { id: `dlq-${d.name}` }, String(d.dead_letter_depth ?? "?")),
      h("button", { type: "button", class: "secondary", id: `redrive-${d.name}`,
        disabled: !d.dead_letter_depth, onclick: () => redrive(d.name) }, "Redrive")])),
  rows.filter((d) => d.exports && d.exports.length).map((d) => h("section", {},
    h("h3", {}, `Last exports of ${d.name}`),
    table(["Export", "Created", "Mode", "Format", "Rows", "Files"], d.exports.map((m) => [
      h("span", { class: "mono" }, m.export_id), when(m.created_ms), m.mode, m.format, String(m.total_rows),
      m.files.map((f) => `${f.name} (${f.rows} rows, ${f.bytes} bytes, sha256 ${f.sha256.slice(0, 12)}…)`).join("; "),
    ])))));
  const redrive = async (name) => {
    note.replaceChildren(h("p", { class: "muted" }, `Redriving ${name}…`));
    try {
      const r = await api("POST", `/destinations/${encodeURIComponent(name)}/redrive`);
      note.replaceChildren(h("p", { class: "ok", id: "redrive-state" },
        `Redriven ${r.redriven} dead letter${r.redriven === 1 ? "" : "s"} of ${r.destination}`));
    } catch (err) {
      note.replaceChildren(problemView(err));
    }
    await load();
  };
  await load();
}
