"""The package's logger, ``logging.getLogger("pyterrier_ce")``: what fit and scoring have to say
(sampling reports, compilation, recoveries). Progress bars stay bars.

As transformers does for its own, the logger prints INFO and above by itself (to stderr; the
command line sends it to stdout with its other output), so a notebook shows its messages without
any set-up; ``logging.getLogger("pyterrier_ce").setLevel("WARNING")`` quiets it, and an
application may attach its own handlers instead.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("pyterrier_ce")


class ConsoleHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` (or ``sys.stdout``) as it is at each message, so that redirections
    made after import (notebooks, test runners) receive it."""

    def __init__(self, stream_name: str = "stderr"):
        super().__init__()
        self.stream_name = stream_name

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys.<stream_name>


console = ConsoleHandler()
if not logger.handlers:
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, here, not again by a root handler
