"""One-off cost probes behind the choices recorded in bench/NOTES.md (not part of `xtask bench`).

Each is run as a module from the repository root, e.g. ``.venv/bin/python -m
bench.probes.relay_cost``; they reuse the harness's processes (``bench.run``).
"""
