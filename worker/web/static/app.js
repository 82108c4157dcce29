// The review app's only script (no build step, nothing fetched from elsewhere): keyboard
// shortcuts, the heatmap toggle and the worklist's live updates. DOM APIs and textContent
// only, never innerHTML, so nothing from the database is ever parsed as HTML.
"use strict";

function typing(event) {
  const t = event.target;
  return t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA");
}

function toggleHeatmap() {
  const heatmap = document.getElementById("heatmap");
  const input = document.getElementById("input");
  const button = document.getElementById("toggle-heatmap");
  if (!heatmap || !button) return;
  const show = heatmap.hidden;
  heatmap.hidden = !show;
  input.hidden = show;
  button.textContent = show ? "Show the image (h)" : "Show heatmap (h)";
}

function imageKeys(event) {
  const walk = document.getElementById("walk");
  if (!walk) return false;
  const key = event.key;
  if (key === "j" && walk.dataset.older) location.href = "/image/" + walk.dataset.older;
  else if (key === "k" && walk.dataset.newer) location.href = "/image/" + walk.dataset.newer;
  else if (key === "a" && document.getElementById("agree")) document.getElementById("agree").click();
  else if (key === "h") toggleHeatmap();
  else if (/^[1-4]$/.test(key)) {
    const button = document.querySelector('button[data-key="' + key + '"]');
    if (button) button.click();
  } else return false;
  return true;
}

function rows() {
  return Array.from(document.querySelectorAll("#worklist tbody tr[data-id]"));
}

function select(index) {
  const all = rows();
  if (!all.length) return;
  index = Math.max(0, Math.min(all.length - 1, index));
  all.forEach((row, i) => row.classList.toggle("selected", i === index));
  all[index].scrollIntoView({block: "nearest"});
}

function worklistKeys(event) {
  const all = rows();
  if (!all.length) return false;
  const current = all.findIndex(row => row.classList.contains("selected"));
  if (event.key === "j") select(current + 1);
  else if (event.key === "k") select(current < 0 ? 0 : current - 1);
  else if ((event.key === "Enter" || event.key === "o") && current >= 0) {
    location.href = "/image/" + all[current].dataset.id;
  } else return false;
  return true;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  return td;
}

function prob(value) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(3);
}

function models(row) {
  return [row.pneumonia_model ? "pneumonia/v" + row.pneumonia_model : "",
          row.infection_model ? "infection/v" + row.infection_model : ""].join(" ").trim();
}

function fill(tr, row, table) {
  tr.replaceChildren();
  tr.dataset.id = row.id;
  tr.dataset.status = row.status;
  const link = document.createElement("a");
  link.href = "/image/" + Number(row.id);
  link.textContent = String(row.id);
  const first = document.createElement("td");
  first.appendChild(link);
  tr.appendChild(first);
  tr.appendChild(cell((row.received_at || "").replace("T", " ").slice(0, 19)));
  tr.appendChild(cell(row.status, "status"));
  tr.appendChild(cell(row.label, "label"));
  tr.appendChild(cell(prob(row.p_pneumonia), "p1"));
  tr.appendChild(cell(prob(row.p_virus), "p2"));
  if (table.dataset.review === "on") tr.appendChild(cell(row.review, "flag"));
  if (table.dataset.gate === "on") tr.appendChild(cell(prob(row.gate_score)));
  tr.appendChild(cell(models(row), "models"));
  tr.appendChild(cell(row.accession_number));
  tr.appendChild(cell(row.study_instance_uid, "uid"));
  tr.appendChild(cell(row.truth, "truth"));
}

async function poll(table) {
  const final = table.dataset.final.split(",");
  const all = rows();
  const newest = all.length ? Number(all[0].dataset.id) : 0;
  const open = all.filter(r => !final.includes(r.dataset.status)).map(r => r.dataset.id);
  const query = new URLSearchParams(table.dataset.query);
  query.set("after", String(newest));
  query.set("ids", open.slice(0, 200).join(","));
  const live = document.getElementById("live");
  try {
    const response = await fetch("/api/worklist?" + query.toString(),
                                 {credentials: "same-origin", headers: {Accept: "application/json"}});
    if (!response.ok) throw new Error(String(response.status));
    const data = await response.json();
    const body = table.tBodies[0];
    const empty = body.querySelector("tr.empty");
    if (empty && data.new.length) empty.remove();
    for (const row of data.new.slice().reverse()) {
      const tr = document.createElement("tr");
      fill(tr, row, table);
      tr.classList.add("fresh");
      body.insertBefore(tr, body.firstChild);
    }
    for (const row of data.rows) {
      const tr = body.querySelector('tr[data-id="' + Number(row.id) + '"]');
      if (tr) fill(tr, row, table);
    }
    live.textContent = "Live: updated " + new Date().toLocaleTimeString();
  } catch (error) {
    live.textContent = "Live updates paused (" + error.message + ")";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const button = document.getElementById("toggle-heatmap");
  const heatmap = document.getElementById("heatmap");
  if (button) button.addEventListener("click", toggleHeatmap);
  if (heatmap && button) {
    // the row names a heatmap this host cannot read (drawn on another worker's disk)
    heatmap.addEventListener("error", () => {
      heatmap.remove();
      button.replaceWith(document.createTextNode("The heatmap file is not available here."));
    });
  }
  const table = document.getElementById("worklist");
  if (table && table.dataset.live === "on") {
    setInterval(() => poll(table), 3000);
  }
  document.addEventListener("keydown", event => {
    if (typing(event) || event.ctrlKey || event.metaKey || event.altKey) return;
    if (imageKeys(event) || worklistKeys(event)) event.preventDefault();
  });
});
