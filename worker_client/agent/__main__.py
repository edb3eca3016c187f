"""`localai-cluster-worker` / `python -m worker_client.agent`."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from worker_client.agent.app import Agent
from worker_client.agent.config import PROG, parse_config
from worker_client.agent.service import CannotListen
from worker_client.agent.state import StateError


def main(argv: Sequence[str] | None = None) -> None:
    """Parses flags and environment (exit 2 on a bad value), then runs the agent until SIGTERM."""
    config = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat is noise
    try:
        code = asyncio.run(Agent(config).run())
    except (CannotListen, StateError) as error:
        sys.exit(f"{PROG}: error: {error}")
    sys.exit(code)


if __name__ == "__main__":
    main()
