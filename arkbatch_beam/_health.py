"""Is the endpoint usable at all? A wrong key, path or endpoint id, told apart from a bad row.

When the first ``FATAL_AFTER`` answers the endpoint gives are all 401/403/404 (no success and
no other answer of any kind in between), the endpoint is declared unusable and
:attr:`EndpointHealth.fatal` holds one message for the user. A few scripted or transient 401s
among other answers never are.

Example:
    >>> from arkbatch_beam._errors import EndpointError
    >>> h = EndpointHealth("https://x/v3/batch/chat/completions", "ARK_API_KEY")
    >>> for _ in range(FATAL_AFTER):
    ...     h.note_error(EndpointError("bad key", http_status=401))
    >>> h.fatal.startswith("the endpoint https://x/v3/batch/chat/completions answered HTTP 401")
    True
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ._errors import ArkError, EndpointError

FATAL_AFTER = 10

log = logging.getLogger("arkbatch_beam")


class EndpointHealth:
    """Counts the endpoint's first answers; sets :attr:`fatal` when all of them say "wrong endpoint"."""

    __slots__ = ("_url", "_key_env", "_redact", "_endpoint_errors", "_other_answers", "fatal")

    def __init__(
        self, url: str, key_env: str, redact: Callable[[str | None], str | None] = lambda s: s
    ) -> None:
        self._url = url
        self._redact = redact
        self._key_env = key_env
        self._endpoint_errors = 0
        self._other_answers = 0
        self.fatal: str | None = None

    def note_answer(self) -> None:
        """Any answer that is not a 401/403/404 (a success, a 429, a 500, ...)."""
        self._other_answers += 1

    def note_error(self, err: ArkError) -> None:
        """An attempt ended in ``err``; returns nothing, may set :attr:`fatal`."""
        if not isinstance(err, EndpointError):
            if err.http_status is not None:  # the endpoint answered something else
                self._other_answers += 1
            return
        self._endpoint_errors += 1
        if self._other_answers == 0 and self._endpoint_errors >= FATAL_AFTER and self.fatal is None:
            if err.http_status is None:  # no answer at all (an untrusted certificate)
                self.fatal = (
                    f"the first {self._endpoint_errors} requests to {self._url} failed and none succeeded: "
                    f"{self._redact(err.message)}"
                )
            else:
                self.fatal = (
                    f"the endpoint {self._url} answered HTTP {err.http_status} "
                    f"({self._redact(err.error_code) or 'no code'}: {self._redact(err.message)}) to the first "
                    f"{self._endpoint_errors} requests and never succeeded: check the model/"
                    f"endpoint id, base_url, path and the key in ${self._key_env}"
                )
            log.error("%s", self.fatal)
