"""The package's public names are exactly what its modules export."""

from __future__ import annotations

import importlib

import gathering_lab

MODULES = [
    "backends",
    "backends.memory",
    "backends.redis",
    "client",
    "events",
    "exceptions",
    "frame",
    "kernel",
    "load",
    "protocol",
    "testing",
    "websocket",
    "websocket.integration",
]


def test_every_public_name_resolves() -> None:
    for name in gathering_lab.__all__:
        assert getattr(gathering_lab, name) is not None, name


def test_top_level_names_come_from_submodules() -> None:
    exported: set[str] = set()
    for module in (
        "events",
        "exceptions",
        "websocket",
        "frame",
        "client",
        "kernel",
        "widgets",
        "load",
    ):
        exported.update(importlib.import_module(f"gathering_lab.{module}").__all__)
    missing = set(gathering_lab.__all__) - exported - {"__version__"}
    assert not missing, f"top-level names not exported by a submodule: {missing}"


def test_submodule_all_lists_exist() -> None:
    for module_name in MODULES:
        module = importlib.import_module(f"gathering_lab.{module_name}")
        for name in module.__all__:
            assert hasattr(module, name), f"{module_name}.{name}"


def test_guide_import_paths() -> None:
    from gathering_lab.events import Event, EventType, event_bus  # noqa: F401
    from gathering_lab.websocket import get_connection_manager  # noqa: F401
    from gathering_lab.websocket.integration import (  # noqa: F401
        setup_custom_broadcasting,
        setup_websocket_broadcasting,
    )


def test_the_server_side_does_not_load_the_notebook_stack() -> None:
    # `gathering-lab serve` must stay small: no pandas, numpy, ipywidgets or IPython.
    import subprocess
    import sys

    code = (
        "import sys, gathering_lab, gathering_lab.cli, gathering_lab.websocket;"
        "gathering_lab.cli._build_parser();"
        "print(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'pandas', 'numpy', 'ipywidgets', 'IPython', 'matplotlib'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
