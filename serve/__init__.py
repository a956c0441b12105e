"""Serve application entrypoint package (`serve run serve.app:app`, `serve deploy serve/config.yaml`)."""
