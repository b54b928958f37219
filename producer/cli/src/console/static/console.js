// warren console: live updates, table sort and filter, purge confirmation. No inline script
// (the Content-Security-Policy forbids it); everything the server sends is already escaped.
"use strict";

const LIVE_EVERY_MS = 3000;
let sortState = null; // {column, descending}

function liveRegion() {
  return document.getElementById("live");
}

// The user is choosing something in the live part: do not swap it under them.
function busy(live) {
  return live.querySelector("input:checked") !== null || live.contains(document.activeElement);
}

async function refresh() {
  const live = liveRegion();
  if (!live || document.visibilityState !== "visible" || busy(live)) return;
  try {
    const response = await fetch(location.href, { headers: { "X-Console-Live": "1" } });
    if (!response.ok) return;
    const html = await response.text();
    if (busy(live)) return;
    live.innerHTML = html;
    live.dataset.refreshed = String(Date.now());
    applySort();
    applyFilter();
  } catch (_) {
    // The console is restarting or unreachable: try again at the next tick.
  }
}

function cellValue(row, column, numeric) {
  const cell = row.cells[column];
  if (!cell) return "";
  const raw = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.trim();
  return numeric ? parseFloat(raw) || 0 : raw.toLowerCase();
}

function applySort() {
  if (!sortState) return;
  const table = document.querySelector("table[data-sortable]");
  if (!table) return;
  const header = table.tHead.rows[0].cells[sortState.column];
  const numeric = header && header.dataset.sort === "num";
  const body = table.tBodies[0];
  const rows = Array.from(body.rows).filter((r) => !r.querySelector(".empty"));
  rows.sort((a, b) => {
    const x = cellValue(a, sortState.column, numeric);
    const y = cellValue(b, sortState.column, numeric);
    const order = x < y ? -1 : x > y ? 1 : 0;
    return sortState.descending ? -order : order;
  });
  rows.forEach((r) => body.appendChild(r));
}

function applyFilter() {
  const input = document.querySelector("input[data-filter-table]");
  if (!input) return;
  const table = document.getElementById(input.dataset.filterTable);
  if (!table) return;
  const words = input.value.trim().toLowerCase();
  Array.from(table.tBodies[0].rows).forEach((row) => {
    row.hidden = words !== "" && !row.textContent.toLowerCase().includes(words);
  });
}

document.addEventListener("click", (event) => {
  const header = event.target.closest("th[data-sort]");
  if (header) {
    const column = header.cellIndex;
    const descending = sortState && sortState.column === column ? !sortState.descending : header.dataset.sort === "num";
    sortState = { column, descending };
    applySort();
    return;
  }
  const button = event.target.closest("button[data-confirm]");
  if (button && !window.confirm(button.dataset.confirm)) {
    event.preventDefault();
  }
});

document.addEventListener("input", (event) => {
  if (event.target.matches("input[data-filter-table]")) applyFilter();
});

setInterval(refresh, LIVE_EVERY_MS);
