"""PostgreSQL query metrics per route and endpoint (``--pg-metrics``, issue 11).

The counts come from the framing watch of :mod:`.pgdrain` (one framing path): it tells
:class:`QueryStats` what each ReadyForQuery closed, and what each ErrorResponse said.
Nothing here touches a prometheus object on the hot path: a session adds into plain
integers of its endpoint's :class:`QueryStats`, and :class:`QueryMetrics` turns them
into families when ``/metrics`` is scraped.

What is counted (docs/ambassador-postgres.md, "Query metrics"):

* a *query* is a simple-protocol Query (``Q``, however many statements it holds) or an
  extended-protocol Execute (``E``); it is counted when the server answers the request
  it belongs to with ReadyForQuery, so the histogram's count always equals the counter;
* its *duration* runs from the Query, or the first Execute of an Execute...Sync cycle,
  sent by the app, to that ReadyForQuery (each Execute of a cycle observes the cycle's
  duration);
* a *transaction* ends at a ReadyForQuery ``I`` that follows a ``T`` or ``E`` one (a
  COMMIT or ROLLBACK of a block), or that closes a request which ran a query while the
  session was idle (an autocommit statement, failed or not);
* an *error* is an ErrorResponse from the server after the startup, by SQLSTATE class
  (the first two characters of its ``C`` field); only the first :data:`ERROR_HEAD`
  bytes of its body are looked at (the server sends ``S``, ``V`` and ``C`` first).

Query text never reaches a metric, nor a log by default. ``--pg-slow-query DURATION``
logs a ``pg_slow_query`` event per query that took at least that long, with the text
(its first :data:`TEXT_HEAD` bytes) passed through :func:`normalize`: every number and
every quoted string becomes ``?``.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any

from podpatterns.ambassador.upstreams import Endpoint
from podpatterns.metrics import (
    LATENCY_BUCKETS,
    CallbackCollector,
    Family,
    Histogram,
    HistogramSample,
    Sample,
)

#: Query duration buckets, in seconds: from an indexed lookup to a report.
QUERY_BUCKETS = LATENCY_BUCKETS
ERROR_HEAD = 128  # ErrorResponse body bytes read for the SQLSTATE (S, V, C come first)
_CLASS_CHARS = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
TEXT_HEAD = 1024  # Query and Parse body bytes kept for --pg-slow-query

# Literals, as PostgreSQL's lexer sees them (scan.l). A string cut by TEXT_HEAD, or one
# whose end is unclear (a backslash before a quote), runs to the end of the text and is
# replaced whole: when in doubt, more is hidden, never less.
_LITERAL = re.compile(
    r"""
      (?:[EeBbXxNn]|[Uu]&)?'(?:[^'\\]|''|\\.)*(?:'|$)     # 'x', E'\n', B'01', U&'d'
    | \$((?:[A-Za-z_][A-Za-z0-9_]*)?)\$.*?(?:\$\1\$|$)       # $$x$$, $tag$x$tag$
    | (?<![\w$])(?:0[xXoObB][0-9a-fA-F_]+|(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    """,
    re.VERBOSE | re.DOTALL,
)
_SPACE = re.compile(r"\s+")


def normalize(text: bytes) -> str:
    """``text`` (up to its NUL) with each number and quoted string replaced by ``?``,
    spaces collapsed."""
    text = text.partition(b"\0")[0]  # a C string in the message, perhaps cut short
    out = _LITERAL.sub("?", text.decode("utf-8", "replace"))
    return _SPACE.sub(" ", out).strip()


def parse_text(body: bytes) -> bytes:
    """The query text of a Parse message's body start (after the statement name)."""
    _, _, rest = body.partition(b"\0")
    return rest.partition(b"\0")[0]


def sqlstate_class(head: bytes) -> str:
    """The SQLSTATE class (``22``) of an ErrorResponse body's start; ``unknown`` if absent."""
    for field in head.split(b"\0"):
        if field[:1] == b"C":
            code = field[1:3]
            if len(code) == 2 and code[0] in _CLASS_CHARS and code[1] in _CLASS_CHARS:
                return code.decode("ascii")
            break
    return "unknown"


class QueryStats:
    """One endpoint's counts: plain integers that sessions add into."""

    __slots__ = ("buckets", "errors", "queries", "seconds", "transactions")

    def __init__(self) -> None:
        self.queries = 0
        self.transactions = 0
        self.errors: Counter[str] = Counter()  # SQLSTATE class
        self.buckets = [0] * (len(QUERY_BUCKETS) + 1)  # per bucket, not cumulative; +Inf last
        self.seconds = 0.0

    def observe(self, seconds: float, queries: int) -> None:
        """``queries`` queries answered, each taking ``seconds``."""
        self.queries += queries
        self.seconds += seconds * queries
        self.buckets[bisect_left(QUERY_BUCKETS, seconds)] += queries


class SlowQueries:
    """``--pg-slow-query``: logs each query of one endpoint that took ``threshold`` or more.

    Args:
        threshold: seconds.
        log: the route's logger.
        endpoint: the endpoint's text, for the event.
    """

    __slots__ = ("endpoint", "log", "threshold")

    def __init__(self, threshold: float, log: Any, endpoint: str) -> None:
        self.threshold = threshold
        self.log = log
        self.endpoint = endpoint

    def report(self, seconds: float, text: bytes) -> None:
        """Log one slow query: its duration and its text without literals."""
        self.log.warning(
            "pg_slow_query",
            upstream=self.endpoint,
            duration_ms=round(seconds * 1000, 1),
            query=normalize(text) if text else "(statement prepared earlier)",
        )


_IDLE = ord("I")


class QueryCycles:
    """One session's requests awaiting their ReadyForQuery, timed and counted.

    Both framing paths feed it one message at a time, with what the *app* sent and
    received: :class:`~.pgdrain.TransactionWatch` for a relayed session, and the pool's
    :class:`~.pgpool.ClientSession` (never the ambassador's own re-prepare Parses,
    stand-in Closes or reset queries). The caller sets :attr:`now` to 0.0 at the start
    of each read, so the clock is read once per read that starts or ends a query.

    Args:
        stats: the endpoint's counts this session adds into (:attr:`stats` may be
            pointed at another endpoint's between transactions: a pooled session).
        slow: with ``--pg-slow-query``, where slow queries are reported.
    """

    __slots__ = ("cycle_start", "cycle_text", "cycles", "executes", "now", "slow", "stats")

    def __init__(self, stats: QueryStats, slow: SlowQueries | None = None) -> None:
        self.stats = stats
        self.slow = slow
        # per request awaiting its ReadyForQuery: (when its first query was sent, queries,
        # its text with --pg-slow-query)
        self.cycles: deque[tuple[float, int, bytes]] = deque()
        self.cycle_text = b""  # the first Parse's text since the last Sync
        self.cycle_start = 0.0  # the first Execute since the last Sync
        self.executes = 0  # Executes since the last Sync
        self.now = 0.0  # the clock of the current read, 0.0 until read

    def _clock(self) -> float:
        if not self.now:
            self.now = time.monotonic()
        return self.now

    def query(self, text: bytes = b"") -> None:
        """A simple-protocol Query (its text's start with ``--pg-slow-query``)."""
        self.cycles.append((self._clock(), 1, text))

    def parse(self, text: bytes) -> None:
        """A Parse's query text (only followed with ``--pg-slow-query``)."""
        self.cycle_text = self.cycle_text or text

    def execute(self) -> None:
        """An extended-protocol Execute."""
        if not self.executes:
            self.cycle_start = self._clock()
        self.executes += 1

    def sync(self) -> None:
        """A Sync: the Executes since the last one are one request."""
        self.cycles.append((self.cycle_start, self.executes, self.cycle_text))
        self.executes = 0
        self.cycle_text = b""

    def function_call(self) -> None:
        """A FunctionCall: answered by a ReadyForQuery, not a query."""
        self.cycles.append((0.0, 0, b""))

    def error(self, head: bytes) -> None:
        """An ErrorResponse from the server (the start of its body)."""
        self.stats.errors[sqlstate_class(head)] += 1

    def ready(self, before: int, status: int) -> None:
        """A ReadyForQuery with ``status``, after one that said ``before``."""
        start, queries, text = self.cycles.popleft() if self.cycles else (0.0, 0, b"")
        stats = self.stats
        if queries:
            now = self._clock()
            stats.observe(now - start, queries)
            if self.slow is not None and now - start >= self.slow.threshold:
                self.slow.report(now - start, text)
        if status == _IDLE and (before != _IDLE or queries):
            stats.transactions += 1


class QueryMetrics:
    """The :class:`QueryStats` of one route's endpoints (by endpoint text)."""

    def __init__(self) -> None:
        self.by_endpoint: dict[str, QueryStats] = {}

    def for_endpoint(self, endpoint: Endpoint) -> QueryStats:
        """The stats a session with ``endpoint`` adds into (made on first use)."""
        key = str(endpoint)
        stats = self.by_endpoint.get(key)
        if stats is None:
            stats = self.by_endpoint[key] = QueryStats()
        return stats


DURATION = "ambassador_pg_query_duration_seconds"


def query_collector(routes: Iterable[tuple[str, QueryMetrics]]) -> CallbackCollector:
    """The query metric families of every route with ``--pg-metrics``.

    Args:
        routes: ``(route name, its QueryMetrics)`` pairs.
    """
    pairs = tuple(routes)

    def counts(attr: str) -> Iterator[Sample]:
        for name, metrics in pairs:
            for endpoint, stats in metrics.by_endpoint.items():
                yield (name, endpoint), float(getattr(stats, attr))

    def errors() -> Iterator[Sample]:
        for name, metrics in pairs:
            for endpoint, stats in metrics.by_endpoint.items():
                for cls, n in stats.errors.items():
                    yield (name, endpoint, cls), float(n)

    def durations() -> Iterator[HistogramSample]:
        for name, metrics in pairs:
            for endpoint, stats in metrics.by_endpoint.items():
                yield (name, endpoint), stats.buckets, stats.seconds

    labels = ("route", "endpoint")
    return CallbackCollector(
        [
            Family(
                "counter",
                "ambassador_pg_queries",
                "PostgreSQL queries answered (--pg-metrics): each Query, each Execute",
                labels,
                lambda: counts("queries"),
            ),
            Family(
                "counter",
                "ambassador_pg_transactions",
                "PostgreSQL transactions ended (--pg-metrics): a ReadyForQuery I after "
                "T or E, or after an autocommit query",
                labels,
                lambda: counts("transactions"),
            ),
            Family(
                "counter",
                "ambassador_pg_errors",
                "PostgreSQL ErrorResponses from the server (--pg-metrics), by SQLSTATE class",
                (*labels, "sqlstate_class"),
                errors,
            ),
            Histogram(
                DURATION,
                "PostgreSQL query duration (--pg-metrics): Query or first Execute sent "
                "by the app to the server's ReadyForQuery",
                labels,
                QUERY_BUCKETS,
                durations,
            ),
        ]
    )
