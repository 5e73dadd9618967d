"""The Python client of both planes (issue 5). It speaks HTTP to the contract and imports no
server module; import-linter holds it to that from the start."""
