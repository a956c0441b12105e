"""`raypipe publish` and `raypipe serve`: functions the CLI's subcommands call (args: argparse.Namespace)."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


def publish_cli(args: Any) -> int:
    """`raypipe publish RUN_DIR --registry DIR --name NAME`: copy a run folder into a new immutable version."""
    from raypipe.registry import publish

    v = publish(args.run_dir, args.registry, args.name, getattr(args, "notes", "") or "")
    log.info("published %s %s at %s", v.name, v.version, v.location or v.path)
    return 0


def serve_cli(args: Any) -> int:
    """`raypipe serve --registry DIR [--port P] [--host H]`: run the Serve app locally until interrupted.

    A non-loopback host needs RAYPIPE_API_TOKEN, or RAYPIPE_INSECURE_NO_TOKEN=1 / `--insecure-no-token`.
    """
    from ray import serve

    from raypipe.ray_utils import init_ray
    from raypipe.serving.app import build_app
    from raypipe.serving.options import ServeOptions, check_bind

    port = int(getattr(args, "port", None) or 8000)
    host = getattr(args, "host", None) or "127.0.0.1"
    options = ServeOptions.from_env()
    if getattr(args, "insecure_no_token", False):
        options = options.model_copy(update={"insecure_no_token": True})
    try:
        check_bind(host, options)  # loopback unless a token is set or --insecure-no-token
    except ValueError as e:
        log.error("%s", e)
        return 2
    if options.insecure_no_token and not options.api_token:
        log.warning("serving on %s WITHOUT a token (--insecure-no-token): anyone who can reach it can use it", host)
    init_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args.registry, options=options), name="raypipe", route_prefix="/")
    log.info("raypipe serving on http://%s:%d (Ctrl-C to stop)", host, port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0
