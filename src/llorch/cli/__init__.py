"""The `llorch` command line (issue 5). It imports only `llorch.client`; import-linter holds
it to that from the start."""
