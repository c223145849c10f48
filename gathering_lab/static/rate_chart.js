// The RateChart widget's front end (anywidget ESM). `uPlot` is defined by the vendored
// uPlot.iife.min.js (MIT, static/uplot/) that the Python side prepends to this module.
//
// Model traits (all set by the kernel, at most once per ticker tick):
//   times:  number[]   the start of each bin, in seconds since the epoch (oldest first)
//   names:  string[]   the series (event types), in legend order
//   values: number[][] one list of events/s per series, aligned with times
//   title:  string
const COLOURS = ["#0969da", "#1a7f37", "#cf222e", "#9a6700", "#8250df", "#bf3989",
                 "#1b7c83", "#953800", "#57606a", "#4d2d00"];

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "gl-rate-chart";
  const heading = document.createElement("div");
  heading.className = "gl-rate-title";
  const latest = document.createElement("div");
  latest.className = "gl-rate-latest";
  const holder = document.createElement("div");
  holder.className = "gl-rate-plot";
  root.append(heading, holder, latest);
  el.appendChild(root);

  let plot = null;
  let key = null;
  const height = () => model.get("height") || 220;
  const width = () => Math.max(holder.clientWidth || el.clientWidth || 600, 200);

  function build(names) {
    if (plot) plot.destroy();
    plot = new uPlot({
      width: width(),
      height: height(),
      legend: { show: names.length > 0, live: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
      // In UTC, like the grid's "received" column and the events' own timestamps.
      tzDate: (seconds) => uPlot.tzDate(new Date(seconds * 1e3), "Etc/UTC"),
      axes: [{ label: "UTC" }, { label: "events/s", size: 50 }],
      series: [{}, ...names.map((name, i) => ({
        label: name,
        stroke: COLOURS[i % COLOURS.length],
        width: 1.5,
        points: { show: false },
      }))],
    }, [[]].concat(names.map(() => [])), holder);
    key = JSON.stringify(names);
  }

  function draw() {
    const names = model.get("names") || [];
    const times = model.get("times") || [];
    const values = model.get("values") || [];
    heading.textContent = model.get("title") || "";
    if (JSON.stringify(names) !== key) build(names);
    plot.setData([times, ...names.map((_, i) => values[i] || [])]);
    // The latest complete bin as text: what a person reads at a glance (and a test can).
    root.dataset.points = String(times.length);
    latest.replaceChildren(...names.map((name, i) => {
      const item = document.createElement("span");
      item.className = "gl-rate-value";
      item.dataset.type = name;
      const series = values[i] || [];
      const value = series.length ? series[series.length - 1] : 0;
      item.style.color = COLOURS[i % COLOURS.length];
      item.textContent = `${name} ${Number(value.toFixed(1))}/s`;
      return item;
    }));
    if (!names.length) latest.textContent = "no events yet";
  }

  const resize = new ResizeObserver(() => {
    if (plot) plot.setSize({ width: width(), height: height() });
  });
  resize.observe(holder);
  for (const name of ["times", "names", "values", "title", "height"]) {
    model.on(`change:${name}`, draw);
  }
  draw();
  return () => {
    resize.disconnect();
    if (plot) plot.destroy();
    for (const name of ["times", "names", "values", "title", "height"]) {
      model.off(`change:${name}`, draw);
    }
  };
}

export default { render };
