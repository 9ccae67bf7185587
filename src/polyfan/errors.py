"""The exceptions polyfan raises, one small tree translated at the edges.

::

    PolyfanError
    ├── ConfigError          bad flags or environment (also a ValueError)
    ├── FeedError            upstream problems
    │   ├── AuthenticationError   fatal, never retried (the proxy's API key, polyfan.client's token)
    │   └── FeedProtocolError     a frame that is not the protocol
    ├── WireError            a ZeroMQ message that does not decode
    ├── ClientError          a WebSocket client sent something invalid
    ├── BridgeError          polyfan.client: the bridge refused or did not answer a request
    └── RecordingError       a recording or flat file that cannot be read or written

The CLI catches :class:`PolyfanError`, prints one line and exits non-zero.
"""

from __future__ import annotations


class PolyfanError(Exception):
    """Base class of every error polyfan raises on purpose."""

    exit_status = 1


class ConfigError(PolyfanError, ValueError):
    """A flag, a file or the environment holds a value polyfan cannot use."""

    exit_status = 2


class FeedError(PolyfanError):
    """The upstream feed failed or said something polyfan cannot accept."""


class AuthenticationError(FeedError):
    """The upstream refused the API key, or (``polyfan.client``) the bridge refused the token.
    Fatal: retrying would only be refused again."""

    exit_status = 2


class FeedProtocolError(FeedError):
    """An upstream frame that is not the Polygon protocol."""


class WireError(PolyfanError):
    """A ZeroMQ message that does not decode as polyfan's wire format."""


class ClientError(PolyfanError):
    """A WebSocket or HTTP client sent something invalid."""


class BridgeError(PolyfanError):
    """``polyfan.client``: the bridge answered an HTTP request with an error, or not at all.

    ``status`` is the HTTP status (None when there was no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RecordingError(PolyfanError):
    """A recording, Parquet file or flat file that polyfan cannot read, or cannot write."""
