"""Run a notebook top to bottom and save it with its outputs and widget state.

    python notebooks/save_with_widgets.py notebooks/01_quickstart.ipynb

Opened later, in JupyterLab or on GitHub, the notebook then shows its widgets as they were
at the end of the run (the workbench with its chart and grid), not ``Workbench(children=…)``
reprs. nbclient's own ``store_widget_state`` keeps only the updates made while a cell runs
(not those of the workbench's ticker between cells), so after the last cell this asks the
kernel for every widget's current state (``Widget.get_manager_state()``, what JupyterLab's
"Save Widget State Automatically" stores) in one more cell, removed before saving. The
output is sanitised so it diffs and stays under ``pytest --nbval-lax``:

- the widget state keeps only the models the outputs show (and the models they refer to),
  and the script fails if an output shows a model the state lacks;
- cells lose nbclient's timing metadata; execution counts follow the cell order.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

logger = logging.getLogger("save_with_widgets")

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_REFERENCE = re.compile(r"IPY_MODEL_([0-9a-f]{32})")
_MARK = "WIDGET-STATE:"
# Run after the last cell: one more ticker tick, then every widget's state as JSON.
_STATE_CELL = f"""\
import asyncio as _asyncio, json as _json, ipywidgets as _ipywidgets
await _asyncio.sleep(1)
print({_MARK!r} + _json.dumps(_ipywidgets.Widget.get_manager_state(drop_defaults=False)))
"""


def shown_models(nb: Any) -> list[str]:
    """The ids of the widget models the notebook's outputs display."""
    return [
        output["data"][WIDGET_VIEW]["model_id"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if WIDGET_VIEW in output.get("data", {})
    ]


def reachable(state: dict[str, Any], roots: list[str]) -> set[str]:
    """``roots`` and every model they refer to (``IPY_MODEL_<id>``), recursively."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        model_id = todo.pop()
        if model_id in seen:
            continue
        if model_id not in state:
            raise SystemExit(f"the saved widget state lacks model {model_id}")
        seen.add(model_id)
        todo.extend(_REFERENCE.findall(json.dumps(state[model_id]["state"])))
    return seen


def sanitise(nb: Any) -> None:
    """Keep the widget models shown, drop timing metadata, number the cells in order."""
    widgets = nb.metadata.get("widgets", {}).get(WIDGET_STATE)
    roots = shown_models(nb)
    if roots and not widgets:
        raise SystemExit("the run saved no widget state")
    if widgets:
        keep = reachable(widgets["state"], roots)
        widgets["state"] = {k: v for k, v in widgets["state"].items() if k in keep}
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        count += 1
        cell.execution_count = count
        for output in cell.outputs:
            if "execution_count" in output:
                output["execution_count"] = count


def main(argv: list[str] | None = None) -> int:
    """Run and save each notebook named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        nb.cells.append(nbformat.v4.new_code_cell(_STATE_CELL))
        client = NotebookClient(
            nb,
            timeout=args.timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
            store_widget_state=False,
            record_timing=False,
        )
        client.execute()
        state_cell = nb.cells.pop()
        text = "".join(o.get("text", "") for o in state_cell.outputs if o.output_type == "stream")
        if _MARK not in text:
            raise SystemExit(f"{path}: the kernel did not report its widget state: {text[:500]}")
        nb.metadata["widgets"] = {WIDGET_STATE: json.loads(text.split(_MARK, 1)[1])}
        sanitise(nb)
        nbformat.write(nb, path)
        state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
        logger.info("%s: saved, %d widget models", path, len(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
