// The EventGrid widget's front end (anywidget ESM): a DOM table of the latest events.
//
// The kernel sends `rows` (the latest matching events, newest first, already filtered and
// sorted) at most once per ticker tick. A click on a header or typing in the filter box sets
// `sort_by` / `descending` / `filter_text` on the model (the kernel then filters the whole
// frame, not only the rows shown) and re-applies the same sort and filter to the rows at
// hand at once, so the table answers without waiting for the kernel. Both sides use the
// same rules: filter = case-insensitive substring of any cell; sort = numbers before text,
// empty cells last, ties keep newest first.

function compare(a, b) {
  const na = typeof a === "number", nb = typeof b === "number";
  if (na !== nb) return na ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

export function arrange(rows, columns, sortBy, descending, filterText) {
  const needle = (filterText || "").trim().toLowerCase();
  let shown = needle
    ? rows.filter((row) => row.some((cell) => cell !== null && String(cell).toLowerCase().includes(needle)))
    : rows.slice();
  const at = columns.indexOf(sortBy);
  if (at >= 0) {
    const empty = shown.filter((row) => row[at] === null || row[at] === "");
    const full = shown.filter((row) => !(row[at] === null || row[at] === ""));
    full.sort((x, y) => (descending ? -1 : 1) * compare(x[at], y[at]));
    shown = full.concat(empty);
  }
  return shown;
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "gl-grid";
  const bar = document.createElement("div");
  bar.className = "gl-grid-bar";
  const filter = document.createElement("input");
  filter.type = "search";
  filter.className = "gl-grid-filter";
  filter.placeholder = "filter rows (any column)";
  filter.maxLength = 200; // EventGrid.MAX_FILTER
  filter.setAttribute("aria-label", "filter rows");
  const status = document.createElement("span");
  status.className = "gl-grid-status";
  bar.append(filter, status);
  const scroller = document.createElement("div");
  scroller.className = "gl-grid-scroll";
  const table = document.createElement("table");
  table.className = "gl-grid-table";
  const thead = document.createElement("thead");
  const tbody = document.createElement("tbody");
  table.append(thead, tbody);
  scroller.appendChild(table);
  root.append(bar, scroller);
  el.appendChild(root);

  function header() {
    const columns = model.get("columns") || [];
    const sortBy = model.get("sort_by");
    const descending = model.get("descending");
    const tr = document.createElement("tr");
    for (const column of columns) {
      const th = document.createElement("th");
      th.textContent = column;
      th.dataset.column = column;
      th.title = "click to sort";
      const sorted = column === sortBy;
      th.setAttribute("aria-sort", sorted ? (descending ? "descending" : "ascending") : "none");
      if (sorted) th.textContent += descending ? " ▼" : " ▲";
      th.addEventListener("click", () => {
        if (model.get("sort_by") === column) {
          model.set("descending", !model.get("descending"));
        } else {
          model.set("sort_by", column);
          model.set("descending", false);
        }
        model.save_changes();
      });
      tr.appendChild(th);
    }
    thead.replaceChildren(tr);
  }

  function body() {
    const columns = model.get("columns") || [];
    const rows = arrange(model.get("rows") || [], columns, model.get("sort_by"),
                         model.get("descending"), model.get("filter_text"));
    const typeAt = columns.indexOf("type");
    tbody.replaceChildren(...rows.map((row) => {
      const tr = document.createElement("tr");
      if (typeAt >= 0 && /\.(failed|error)$/.test(String(row[typeAt]))) tr.className = "gl-grid-bad";
      for (const cell of row) {
        const td = document.createElement("td");
        td.textContent = cell === null ? "" : String(cell);
        tr.appendChild(td);
      }
      return tr;
    }));
    root.dataset.rows = String(rows.length);
    status.textContent = model.get("status") || "";
  }

  filter.value = model.get("filter_text") || "";
  filter.addEventListener("input", () => {
    model.set("filter_text", filter.value);
    model.save_changes();
  });
  const onFilter = () => {
    if (filter.value !== model.get("filter_text")) filter.value = model.get("filter_text") || "";
    body();
  };
  const onSort = () => { header(); body(); };
  model.on("change:rows", body);
  model.on("change:status", body);
  model.on("change:filter_text", onFilter);
  model.on("change:sort_by", onSort);
  model.on("change:descending", onSort);
  model.on("change:columns", onSort);
  header();
  body();
  return () => {
    model.off("change:rows", body);
    model.off("change:status", body);
    model.off("change:filter_text", onFilter);
    model.off("change:sort_by", onSort);
    model.off("change:descending", onSort);
    model.off("change:columns", onSort);
  };
}

export default { render };
