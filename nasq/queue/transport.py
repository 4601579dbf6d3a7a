"""kombu's Redis transport, as nasq relies on it: what is queued and what was delivered but not
acknowledged (``BrokerView``, read with kombu's own key names), and a transport that survives a
broker at ``maxmemory`` (``Transport``).

It is also the only module that reaches into Celery's and kombu's objects beyond their
documented calls: a submission sent as one pipelined write (``sending_in_one_write``) and a
closing client's forgotten result subscriptions (``forget_result_subscriptions``).

This is the only module that knows how kombu lays messages out in Redis: one list per queue and
priority step (``<queue><sep><step>``, the step-0 list being the queue's own name), and the
``unacked`` hash and ``unacked_index`` sorted set of delivered messages, all under the
transport's ``global_keyprefix``. ``tests/integration/test_transport.py`` fails if a kombu
release changes that layout.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from functools import cached_property

import redis
from celery.backends import redis as celery_redis
from celery.backends.redis import RedisBackend
from kombu.exceptions import BatchPublishError, OperationalError
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual

log = logging.getLogger("nasq.broker")

#: one submission at a time per process: ``_sending_unawaited`` patches the app for its block
_SENDING = threading.Lock()


@contextmanager
def _sending_unawaited(app, producer):
    """Every message ``app`` sends in this block goes through ``producer`` (and so into its
    publish batch: a chord does not hand the producer it is given on to its header's group), and
    the result backend subscribes to none of their results (the client follows the run's record)."""
    backend = app.backend
    subscribing = getattr(backend, "subscribe_on_send", None)  # nasq's ResultBackend (redis) only
    app.producer_or_acquire = lambda producer_=None: nullcontext(producer_ or producer)
    if subscribing is not None:
        backend.subscribe_on_send = False
    try:
        yield
    finally:
        del app.producer_or_acquire  # the class's method again
        if subscribing is not None:
            backend.subscribe_on_send = subscribing


@contextmanager
def sending_in_one_write(app, messages: int):
    """Every message ``app`` sends in this block (about ``messages`` of them, each with its
    task-sent event) goes to the broker in one pipelined write when the block ends, and the
    client subscribes to none of their results. A write the broker refused raises the broker's
    own error."""
    try:
        with _SENDING, app.producer_or_acquire() as producer, producer.batch(max_size=4 * messages + 1000), \
                _sending_unawaited(app, producer):
            yield
    except BatchPublishError as e:  # the pipelined write failed: say why as the broker said it
        raise (e.__cause__ if isinstance(e.__cause__, Exception) else OperationalError(str(e))) from None


def forget_result_subscriptions(app) -> None:
    """Results collected later (``AsyncResult.__del__``) would unsubscribe over the pubsub
    connection after a private Redis stopped: forget this client's subscriptions now."""
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None and hasattr(consumer, "subscribed_to"):
        consumer.subscribed_to.clear()


class BrokerView:
    """Read-only questions about the broker's queues, asked over the broker's own connection
    (never the result backend's: with ``result_backend`` on another Redis the queues are not
    there)."""

    def __init__(self, url: str, transport_options: dict | None = None, *, connect_timeout_s: float = 5.0,
                 socket_timeout_s: float | None = 30.0, client: redis.Redis | None = None):
        opts = dict(transport_options or {})
        channel = kombu_redis.Channel
        self.prefix = opts.get("global_keyprefix", channel.global_keyprefix) or ""
        self.sep = channel.sep
        self.steps = list(opts.get("priority_steps", channel.priority_steps))
        self.unacked_key = self.prefix + opts.get("unacked_key", channel.unacked_key)
        self.unacked_index_key = self.prefix + opts.get("unacked_index_key", channel.unacked_index_key)
        #: ``client``: a client of the same Redis to share (one connection less per process)
        self.owned = client is None
        self.r = client if client is not None else redis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s)

    @classmethod
    def for_app(cls, app, settings, *, share=None) -> BrokerView:
        """The view of ``app``'s broker; ``share``: a run store whose client it uses when the
        store is on the broker's Redis (no result backend of its own)."""
        same = share is not None and settings.backend_url == app.conf.broker_url
        return cls(app.conf.broker_url, app.conf.broker_transport_options,
                   connect_timeout_s=settings.broker_connect_timeout_s,
                   socket_timeout_s=settings.broker_socket_timeout_s, client=share.r if same else None)

    def _lists(self, queue: str) -> list[str]:
        """kombu's lists of ``queue``, one per priority step (``Channel._q_for_pri``)."""
        return [self.prefix + (f"{queue}{self.sep}{step}" if step else queue) for step in self.steps]

    def queued(self, queue: str) -> int:
        """Messages waiting in ``queue``."""
        with self.r.pipeline(transaction=False) as p:
            for name in self._lists(queue):
                p.llen(name)
            return sum(p.execute())

    def queued_task_ids(self, queue: str) -> set[str]:
        """The task ids of the messages waiting in ``queue`` (read whole: for ``nasq resume``)."""
        with self.r.pipeline(transaction=False) as p:
            for name in self._lists(queue):
                p.lrange(name, 0, -1)
            lists = p.execute()
        return {tid for items in lists for tid in map(_task_id, items) if tid}

    def unacked_ages(self) -> dict[str, float]:
        """Task id -> seconds since its latest delivery, for messages delivered to a worker and not
        acknowledged (a lost worker's message stays there until the visibility timeout)."""
        now, out = time.time(), {}
        since = {k.decode(): t for k, t in self.r.zrange(self.unacked_index_key, 0, -1, withscores=True)}
        for tag, raw in self.r.hgetall(self.unacked_key).items():
            try:
                task_id = _task_id(json.loads(raw)[0])
            except (ValueError, IndexError, TypeError):
                continue
            if task_id:
                age = now - since.get(tag.decode(), now)
                out[task_id] = min(age, out.get(task_id, age))  # a message redelivered to another worker
        return out

    def server_id(self) -> str | None:
        """The broker server's run id: it changes when Redis restarts."""
        try:
            return self.r.info("server").get("run_id")
        except redis.exceptions.ResponseError:  # INFO refused (a managed Redis)
            return None

    def close(self) -> None:
        if self.owned:
            self.r.close()


def _task_id(envelope) -> str | None:
    """The task id in a kombu message envelope (its headers are JSON, signed or not)."""
    try:
        if isinstance(envelope, (bytes, str)):
            envelope = json.loads(envelope)
        return envelope["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------ a full broker

_said = [0.0]


def _say_full(what: str) -> None:
    """One log line a minute at most: the broker is full."""
    if time.time() - _said[0] >= 60:
        _said[0] = time.time()
        log.warning("the broker is full (Redis reached maxmemory with maxmemory-policy noeviction): %s; free memory "
                    "or raise maxmemory and the run goes on", what)


class QoS(kombu_redis.QoS):
    """kombu's QoS, with its bookkeeping of deliveries and acks sent without MULTI, and minus the
    crash at ``maxmemory``: Redis refuses every command of a MULTI block while it is out of
    memory, even the ones that free memory, and a worker whose bookkeeping failed exits
    ("Unrecoverable error").

    Here a delivery that cannot be recorded in ``unacked`` runs all the same (if its worker dies,
    the shard's lease recovers it); an ack's ZREM and HDEL are allowed while Redis is full; a
    message that cannot be put back on its queue is taken out of ``unacked`` (healing sends it
    again)."""

    @contextmanager
    def pipe_or_acquire(self, pipe=None, client=None):
        """kombu's bookkeeping of a delivery (ZADD and HSET) and of its ack (ZREM and HDEL) as a
        pipeline without MULTI/EXEC: one round trip as before, two commands fewer each. The
        index and the hash need no transaction: kombu's restore skips an index entry whose
        message is not in the hash, and removes both either way."""
        if pipe is not None:
            yield pipe
        else:
            with self.channel.conn_or_acquire(client) as client:
                yield client.pipeline(transaction=False)

    def append(self, message, delivery_tag):
        try:
            super().append(message, delivery_tag)
        except redis.exceptions.OutOfMemoryError:
            _say_full(f"delivery {delivery_tag} could not be recorded as unacknowledged; it runs anyway")
            virtual.QoS.append(self, message, delivery_tag)

    def restore_by_tag(self, tag, client=None, leftmost=False):
        try:
            super().restore_by_tag(tag, client=client, leftmost=leftmost)
        except redis.exceptions.OutOfMemoryError:
            _say_full(f"delivery {tag} could not be put back on its queue (the run's healing sends it again)")
            self._remove_from_indices(tag).execute()


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with ``QoS`` above (``broker_transport`` of every nasq app)."""

    Channel = Channel


#: what ``broker_transport`` names
TRANSPORT = f"{__name__}:Transport"


#: Celery's script that counts a chord's part (``CHORD_PART_RETURN_LUA``), with two changes: the
#: chord's keys are given their expiry by its first part, not again by every part (five commands
#: a shard), and the chord's size and its diff are read in one MGET. Its count, its check for a
#: part counted twice and its claim of the callback are Celery's own. Celery's script as it is
#: if a release changes the lines this edits (a test fails then).
_CHORD_EDITS = (("if expires > 0 then\n    for _, key in ipairs({jkey, tkey, skey, dkey}) do",
                 "if expires > 0 and readycount == 1 then\n    for _, key in ipairs({jkey, tkey, skey, dkey}) do"),
                ("local totaldiff = redis.call('GET', tkey)\nlocal size = redis.call('GET', skey)\n",
                 "local pair = redis.call('MGET', tkey, skey)\nlocal totaldiff, size = pair[1], pair[2]\n"))


def _edited(script: str, edits) -> str:
    """``script`` with every edit made, or as it is if any of them does not apply."""
    out = script
    for old, new in edits:
        if out.count(old) != 1:
            return script
        out = out.replace(old, new)
    return out


CHORD_PART_RETURN = _edited(celery_redis.CHORD_PART_RETURN_LUA, _CHORD_EDITS)


class ResultBackend(RedisBackend):
    """Celery's Redis result backend, waiting out a full broker where it writes (a task's state,
    a chord's count) instead of failing: otherwise a task whose STARTED state cannot be stored
    fails before its body runs and its message is consumed, so that a worker at maxmemory eats
    its queue. A worker waits where it stands, holding its one message, saying so once a minute."""

    #: False while a client sends tasks it never waits on by their results (a run's shards and
    #: merge: it follows the run's record): Celery would subscribe to each one's result channel
    subscribe_on_send = True

    def on_task_call(self, producer, task_id):
        if self.subscribe_on_send:
            super().on_task_call(producer, task_id)

    def add_pending_result(self, result, weak=False, start_drainer=True):
        if not self.subscribe_on_send:  # a group's results, followed by its promise: not waited on
            return result
        return super().add_pending_result(result, weak=weak, start_drainer=start_drainer)

    def _set(self, key, value, expires=None):
        return _wait_while_full(lambda: super(ResultBackend, self)._set(key, value, expires), "store a task's state")

    @cached_property
    def _chord_part_return_script(self):
        return self.client.register_script(CHORD_PART_RETURN)

    def on_chord_part_return(self, request, state, result, propagate=None, **kwargs):
        return _wait_while_full(lambda: super(ResultBackend, self).on_chord_part_return(
            request, state, result, propagate=propagate, **kwargs), "count a chord's part")


def _wait_while_full(call, what: str):
    pause = 0.5
    while True:
        try:
            return call()
        except redis.exceptions.OutOfMemoryError:
            _say_full(f"waiting to {what}")
            time.sleep(pause)
            pause = min(5.0, pause * 2)


def result_backend_url(url: str | None) -> str | None:
    """The ``result_backend`` setting that selects ``ResultBackend`` for a redis(s):// URL."""
    return f"{__name__}:ResultBackend+{url}" if url and url.startswith(("redis://", "rediss://")) else url
