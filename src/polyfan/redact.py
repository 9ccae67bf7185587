"""Credentials out of URLs before they reach a log line, an error message or a repr.

Pure string functions, no I/O; every role imports them.

- :func:`mask_url` masks one URL: the password of ``user:pass@`` (``user:****@``), a userinfo
  with no password as a whole (``wss://KEY@host`` -> ``wss://****@host``: a lone userinfo is
  usually a key), and the value of every credential parameter in the query or the fragment
  (``apiKey``, ``apikey``, ``api_key``, ``api-key``, ``key``, ``token``, ``access_token``,
  ``auth``, ``password``, ``secret``; case-insensitive, percent-encoded names too). Host, port
  (IPv6 included), path and other parameters are kept, so the line still says where it went.
- :func:`mask_urls_in` does the same to every URL inside a longer text (an exception's
  message, a formatted log line with its traceback), and to credential parameters outside any
  URL (an HTTP request line such as ``GET /stocks?apiKey=...``).
- :class:`MaskingFormatter` wraps the CLI's log formatter so that every line every role writes
  goes through :func:`mask_urls_in`: the shells mask what they log, and this is the net under
  them (third-party messages, tracebacks).

None of them ever raises, whatever the input: a function that guards logs must not be the
reason a log line (or the error it reports) is lost.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote

MASK = "****"

CREDENTIAL_PARAMS = frozenset(
    {
        "apikey",
        "api_key",
        "api-key",
        "key",
        "token",
        "access_token",
        "auth",
        "password",
        "secret",
    }
)

# ``name=value`` after ``?``, ``&``, ``;`` or ``#`` (a URL's query or fragment).
_PARAM = re.compile(r"([?&;#])([^=&;#?\s]*)=([^&;#\s]*)")
# ``name=value`` anywhere in a text, for names that are credentials whatever the context.
_TEXT_PARAM = re.compile(
    r"(?i)(?<![A-Za-z0-9_.-])(api[_-]?key|access_token|token|password|secret)=([^&;#\s'\"<>,)\]]*)"
)
# A URL inside free text: scheme://, then anything up to white space or a quote/bracket, not
# ending in the punctuation of the sentence around it ("connecting to URL, subscribing").
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?:[^\s'\"<>]*[^\s'\"<>,.;:!?)\]])?")
# A userinfo after ``://`` whatever it holds (a quote in a password ends the URL above).
_USERINFO_IN_TEXT = re.compile(r"://([^\s/?#]*)@")


def _is_credential(name: str) -> bool:
    try:
        return unquote(name).strip().lower() in CREDENTIAL_PARAMS
    except Exception:  # never raise from a log guard
        return name.lower() in CREDENTIAL_PARAMS


def _mask_param(match: re.Match[str]) -> str:
    sep, name, value = match.group(1), match.group(2), match.group(3)
    if value and _is_credential(name):
        return f"{sep}{name}={MASK}"
    return match.group(0)


def _mask_userinfo(authority: str) -> str:
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        return authority
    user, colon, _password = userinfo.partition(":")
    if colon:
        return f"{user}:{MASK}@{hostport}"
    return f"{MASK}@{hostport}"


def mask_url(url: str) -> str:
    """``url`` with its credentials replaced by ``****``; never raises.

    >>> mask_url("wss://me:s3cret@[::1]:8443/stocks?apiKey=K&x=1#token=T")
    'wss://me:****@[::1]:8443/stocks?apiKey=****&x=1#token=****'
    """
    try:
        text = url if isinstance(url, str) else str(url)
        scheme_end = text.find("://")
        start = scheme_end + 3 if scheme_end >= 0 else 0
        end = len(text)
        for stop in "/?#":
            at = text.find(stop, start)
            if 0 <= at < end:
                end = at
        # An ``@`` later in the path (before the query) may end a userinfo holding an
        # unencoded ``/``: mask up to it rather than risk showing a password.
        query = min(
            (i for i in (text.find("?", start), text.find("#", start)) if i >= 0), default=len(text)
        )
        last_at = text.rfind("@", start, query)
        if last_at >= end:
            end = text.find("/", last_at)
            end = query if end < 0 or end > query else end
        authority = _mask_userinfo(text[start:end])
        rest = _PARAM.sub(_mask_param, text[end:])
        return text[:start] + authority + rest
    except Exception:  # a log guard never raises: say nothing rather than leak
        return MASK


def mask_urls_in(text: str) -> str:
    """``text`` with every URL in it masked by :func:`mask_url`, and credential parameters
    outside URLs too; never raises."""
    try:
        masked = _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)
        masked = _USERINFO_IN_TEXT.sub(lambda m: "://" + _mask_userinfo(m.group(1) + "@"), masked)
        return _TEXT_PARAM.sub(
            lambda m: f"{m.group(1)}={MASK}" if m.group(2) else m.group(0), masked
        )
    except Exception:
        return MASK


class MaskingFormatter(logging.Formatter):
    """Formats with ``inner`` (message, traceback and all), then masks URL credentials."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner if inner is not None else logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return mask_urls_in(self.inner.format(record))


def install(logger: logging.Logger) -> None:
    """Wrap the formatter of every handler of ``logger`` (the CLI passes the root logger)."""
    for handler in logger.handlers:
        if not isinstance(handler.formatter, MaskingFormatter):
            handler.setFormatter(MaskingFormatter(handler.formatter))
