"""`channels.testing.WebsocketCommunicator` without daphne: the `channels.testing` package imports its
live-server test case, which needs daphne (not a dependency here). That one import is stubbed; the communicator
itself is Channels' own."""

from __future__ import annotations

import sys
import types

try:
    from channels.testing import WebsocketCommunicator
except ModuleNotFoundError as error:  # pragma: no cover - depends on whether daphne is installed
    if error.name != "daphne":
        raise
    live = types.ModuleType("channels.testing.live")
    live.ChannelsLiveServerTestCase = None
    sys.modules["channels.testing.live"] = live
    from channels.testing import WebsocketCommunicator

__all__ = ["WebsocketCommunicator"]
