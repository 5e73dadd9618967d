"""The developer tools' logic: ``python3 xtask.py COMMAND`` runs ``.venv/bin/python -m tools.X``.

Each module is one tool (metrics lint, spec extractor, contract and pact runs, status coverage,
soak) or one helper they share (``server``: start, wait for and stop a server process;
``debian``: install a Debian tool that is missing). They run inside ``.venv``, are checked by
ruff and mypy strict like ``src/``, and are tested under ``tests/tools/``.
"""
