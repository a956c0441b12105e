"""Serve entrypoint for a checkout: `RAYPIPE_REGISTRY=DIR serve run serve.app:app` (from the repository root).

`serve deploy serve/config.yaml` uses the installed builder `raypipe.serving.app:build` with typed args instead.

Options come from the environment (RAYPIPE_API_TOKEN, RAYPIPE_MAX_REQUEST_BYTES, RAYPIPE_JOB_TTL_S,
RAYPIPE_MODEL_CT / _XRAY / _PVF / _LDM / _KEYPOINTS to use other registry names, empty to disable).
The app is built when Serve imports this module, which is the documented contract of `import_path`.
"""
from raypipe.serving.app import build_app_from_env

app = build_app_from_env()
