"""Reaching the broker: one bounded probe before anything else talks to it.

A worker or a client first PINGs the broker with the connect and socket timeouts of the
settings, so that a wrong password ends at once with one line (instead of Celery's hundred
retries), an unreachable host is named, and a server that accepts connections but never
answers cannot hang the process.
"""
from __future__ import annotations

import redis

from ..config import Settings, redact
from ..errors import BrokerTrouble


class BrokerError(BrokerTrouble):
    """The broker cannot be used: unreachable, silent, or refusing our credentials."""


class BrokerAuthError(BrokerError):
    """The broker refused the password (or wants one): retrying cannot help."""


#: a PING is answered at once by any Redis that is up: a longer silence is a broker that is not
PING_TIMEOUT_S = 5.0


def probe(settings: Settings, url: str | None = None) -> None:
    """PING the broker (or ``url``) once, within the connect timeout and at most ``PING_TIMEOUT_S``
    (or the socket timeout, if shorter) for the answer.

    Raises:
        BrokerAuthError: a wrong or missing password (fatal: fix the URL).
        BrokerError: the broker is unreachable or did not answer in time.
    """
    url = url or settings.broker_url
    wait = min(PING_TIMEOUT_S, settings.broker_socket_timeout_s or PING_TIMEOUT_S)
    r = redis.Redis.from_url(url, socket_connect_timeout=settings.broker_connect_timeout_s,
                             socket_timeout=wait, retry=None)
    try:
        r.ping()
    except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError) as e:
        if not isinstance(e, redis.exceptions.AuthenticationError) and not any(
                w in str(e) for w in ("NOAUTH", "WRONGPASS", "AUTH", "password")):
            raise BrokerError(f"the broker {redact(url)} answered PING with an error: {_first_line(e)}") from None
        if "@" not in url.partition("://")[2]:
            raise BrokerAuthError(f"the broker {redact(url)} wants a password: put it in the broker URL "
                                  "(redis://:PASSWORD@HOST:6379/0)") from None
        raise BrokerAuthError(f"the broker {redact(url)} refused the credentials in the broker URL: check the "
                              "user and password (redis://[USER]:PASSWORD@HOST:6379/0)") from None
    except redis.exceptions.TimeoutError:
        raise BrokerError(f"the broker {redact(url)} accepted the connection but did not answer within "
                          f"{wait:g} s (a PING): is it a Redis server, and is it overloaded?") from None
    except redis.exceptions.ConnectionError as e:
        raise BrokerError(f"cannot reach the broker {redact(url)}: {_first_line(e)}") from None
    finally:
        r.close()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
