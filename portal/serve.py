"""Running the portal: in the foreground (``corelab portal``) or in a thread beside the DICOM node
(``corelab serve``)."""

from __future__ import annotations

import threading

import uvicorn

from corelab.settings import Settings


def portal_server(settings: Settings) -> uvicorn.Server:
    from portal.app import create_app

    # proxy_headers: behind a TLS proxy on this machine, X-Forwarded-Proto says the request was
    # HTTPS (Secure cookies); only the loopback proxy is trusted to say so.
    config = uvicorn.Config(create_app(settings), host=settings.portal_host, port=settings.portal_port,
                            proxy_headers=True, forwarded_allow_ips="127.0.0.1,::1", log_level="warning",
                            server_header=False)
    return uvicorn.Server(config)


def run_portal(settings: Settings) -> None:
    print(f"corelab portal: http://{settings.portal_host}:{settings.portal_port}/", flush=True)
    portal_server(settings).run()


def start_portal_thread(settings: Settings) -> tuple[uvicorn.Server, threading.Thread]:
    """Start the portal in a daemon thread; ``server.should_exit = True`` stops it."""
    server = portal_server(settings)
    server.install_signal_handlers = lambda: None  # the main thread owns the signals
    thread = threading.Thread(target=server.run, name="corelab-portal", daemon=True)
    thread.start()
    return server, thread
