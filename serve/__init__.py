"""Serve application entrypoint package (`serve run serve.app:app`; `serve deploy serve/config.yaml`
imports the installed builder `raypipe.serving.app:build` instead)."""
