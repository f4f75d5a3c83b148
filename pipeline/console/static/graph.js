// The identity graph of one profile as an inline SVG: the profile in the middle, its identities around it
// (one colour per namespace), and the profiles merged into it.
import { s } from "./dom.js";

const COLOURS = ["#0b5fff", "#e07a00", "#0a7a35", "#8a2be2", "#b00020", "#00838f", "#6d4c41", "#c2185b"];

export function identityGraph(profile) {
  const nodes = [];
  const namespaces = Object.keys(profile.identity_links || profile.identities || {});
  namespaces.forEach((ns, i) => {
    const ids = Object.keys((profile.identity_links || {})[ns] || {}).length
      ? Object.keys(profile.identity_links[ns]) : profile.identities[ns] || [];
    for (const id of ids) nodes.push({ label: `${ns}: ${id}`, colour: COLOURS[i % COLOURS.length], kind: "identity" });
  });
  for (const pid of profile.merged_profiles || []) nodes.push({ label: `merged ${pid}`, colour: "#777", kind: "merged" });
  // room for the labels on both sides: they are up to 34 characters long
  const width = 680, height = Math.max(260, 120 + nodes.length * 14), cx = width / 2, cy = height / 2;
  const r = Math.min(cx - 230, cy - 40);
  const svg = s("svg", { class: "graph", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `Identity graph: ${nodes.length} identities and merged profiles in ${namespaces.length} namespaces` });
  svg.append(s("title", {}, `Identity graph of profile ${profile.profile_id}`));
  nodes.forEach((n, i) => {
    const a = (2 * Math.PI * i) / Math.max(nodes.length, 1) - Math.PI / 2;
    n.x = cx + r * Math.cos(a);
    n.y = cy + r * Math.sin(a);
    svg.append(s("line", { x1: cx, y1: cy, x2: n.x, y2: n.y, "stroke-dasharray": n.kind === "merged" ? "4 3" : "" }));
  });
  for (const n of nodes) {
    const right = n.x >= cx;
    const text = n.label.length > 34 ? `${n.label.slice(0, 33)}…` : n.label;
    svg.append(s("g", { class: `node ${n.kind}` },
      s("title", {}, n.label),
      s("circle", { cx: n.x, cy: n.y, r: 7, fill: n.colour }),
      s("text", { x: n.x + (right ? 10 : -10), y: n.y + 4, "text-anchor": right ? "start" : "end" }, text)));
  }
  svg.append(s("g", { class: "node profile" },
    s("circle", { cx, cy, r: 16, fill: "#1d232a" }),
    s("text", { x: cx, y: cy + 32, "text-anchor": "middle" }, `profile ${profile.profile_id.slice(0, 12)}…`)));
  return svg;
}
