"""A local AWS endpoint for demos, tests and benchmarks: a moto server on 127.0.0.1.

moto is a development dependency; it is imported only when an endpoint is started.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

#: Dummy credentials for the local endpoint (it accepts any; boto3 only needs some).
LOCAL_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@contextlib.contextmanager
def local_aws_endpoint(port: int = 0) -> Iterator[str]:
    """Run a moto server on ``127.0.0.1:port`` (0: a free port) and yield its URL; stop it after."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        host, bound = server.get_host_and_port()
        yield f"http://{host}:{bound}"
    finally:
        server.stop()
