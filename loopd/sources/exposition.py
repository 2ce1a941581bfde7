"""A scraped ``/metrics`` body as samples: prometheus-client parses, loopd remembers.

Every series is parsed by prometheus-client's text-format parser
(``prometheus_client.parser``; OpenMetrics lines too, reduced to that format as below):
loopd has no parser of its own. What it adds is memory, because a target exposes the same
series every scrape and only their values change: a text-format line whose series part
(everything before the value: ``name{labels}``) was parsed in the previous scrape of that
target is not parsed again; its value (and timestamp) are read with ``float``/``int``, and
anything unusual about them (an ``_``, a third field, an exemplar) sends the line to the
parser after all. This is what keeps the parse of a round of 100,000 samples cheap
(benchmarks/scrape.py). OpenMetrics bodies (rarer, ending with ``# EOF``) go through the
same name filters and ``limit`` first, so a body of junk costs what the text format's
costs; their kept sample lines, without exemplar and timestamp (read here, in seconds),
then go to the text-format parser every time: OpenMetrics' own parser refuses what
filtering leaves of a valid body (a histogram without its ``+Inf`` bucket, a family split
by a dropped line).

A body is read a segment at a time (``_SEGMENT``), not split whole: a 16 MiB body of short
lines would be millions of strings at once. Once ``limit`` series are kept, the rest of
the body is not read: its lines (comment lines aside) are counted as ``beyond`` with
``str.count``, whatever their names.

What becomes a topic level must be one: a series whose name holds ``/``, ``+``, ``#`` or
a control character (possible with the UTF-8 quoted names, ``{"a/b"} 1``) is dropped and
counted in ``unsafe``. An exposed ``up`` is renamed ``exported_up``: ``up`` is the one
loopd synthesizes for every scrape.

Comment lines (``# HELP``, ``# TYPE``) are skipped: loopd reads sample names, not types,
so a histogram's ``_bucket`` samples are samples like any other.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

TARGET_LABELS = ("instance", "job")
RESERVED = {"up": "exported_up"}  # exposed name -> the name loopd gives it
_MEMO = 10_000  # names a filter remembers its answer for (a target may expose millions)
_SEGMENT = 64 * 1024  # characters of a body split into lines at a time
# what cannot be part of a topic level (MQTT-style wildcards, the separator, controls)
_UNSAFE = re.compile(r"[/+#\x00-\x1f\x7f]")


class ExpositionError(ValueError):
    """The body is not valid exposition text; the message says where."""


def name_filter(allow: list[str], deny: list[str]) -> Callable[[str], bool]:
    """Whether a metric name is kept: it matches an ``allow`` glob (or ``allow`` is empty)
    and no ``deny`` glob. Compiled once; answers are remembered per name, for ``_MEMO``
    names at most (then forgotten all at once: a target inventing names costs a
    recompute, never memory)."""
    def union(globs: list[str]) -> re.Pattern[str] | None:
        return re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None

    allowed, denied = union(allow), union(deny)
    known: dict[str, bool] = {}

    def keep(name: str) -> bool:
        answer = known.get(name)
        if answer is None:
            answer = (allowed is None or allowed.match(name) is not None) and (
                denied is None or denied.match(name) is None)
            if len(known) >= _MEMO:
                known.clear()
            known[name] = answer
        return answer
    return keep


# One kept series of a target as loopd hands it on, built once when first seen:
# (field, topic, labels, headers, rated).
#
# ``field`` names it in ``telemetry[key]``: the metric name when the series has no labels
# besides the target's, else ``name{label="value",...}`` (labels sorted, values escaped as
# in the text format, so a field never holds a newline). ``labels`` and ``headers`` are
# shared by every event of the series and must not be changed; ``rated``: sent as a rate.
#
# A plain tuple of strings, string dicts and a bool, on purpose: the garbage collector
# stops tracking such a tuple once it has seen it (not a NamedTuple's or a class's
# instances), and a scrape source keeps one per series of every target (100,000 in
# benchmarks/scrape.py) that each full collection would otherwise walk.
Series = tuple[str, str, dict[str, str], dict[str, str], bool]


# One kept sample line of a scrape, in body order: its series, its value, and its
# timestamp in seconds when the line carries one. A plain tuple: a scrape makes 100,000.
Row = tuple[Series, float, float | None]


@dataclass(slots=True)
class Parsed:
    """What ``parse`` made of a body: the kept ``rows`` (at most ``limit``), how many
    lines came ``beyond`` the limit, how many kept series had an ``unsafe`` name (see the
    module docstring), and the series ``seen`` (the next scrape's ``known``)."""

    rows: list[Row]
    beyond: int
    seen: dict[str, Series]
    unsafe: int = 0


@dataclass(slots=True)
class Labeler:
    """Builds a target's ``Series`` from prometheus-client samples: its filters, its target
    labels and ``honor_labels`` (as Prometheus: by default an exposed ``instance`` or
    ``job`` is kept as ``exported_instance``/``exported_job`` and the target's win; with
    ``honor_labels`` the exposed ones win in the labels).

    The topic always names the target's ``instance``, never an exposed one: a target must
    not speak for another host (``metrics/web-1/...``) nor put a wildcard in a topic. An
    exposed ``instance``/``job`` that differs from the target's is part of the field (so of
    the event id): two series that differ only there stay two series."""

    keep: Callable[[str], bool]
    rate: Callable[[str], bool]
    target_labels: dict[str, str]
    honor_labels: bool

    def series(self, sample: Sample) -> Series | None:
        """The series of ``sample``, None when the filters drop its name (the caller has
        checked that the name is safe in a topic)."""
        name = sample.name
        if not self.keep(name):
            return None
        rated = self.rate(name)
        name = RESERVED.get(name, name)
        target = self.target_labels
        labels = dict(sample.labels)
        for label, value in target.items():
            if label not in labels:
                labels[label] = value
            elif not self.honor_labels:
                labels[f"exported_{label}"] = labels[label]
                labels[label] = value
        own = sorted((k, v) for k, v in labels.items() if target.get(k) != v)
        fld = name if not own else name + "{" + ",".join(
            f'{k}="{_escape(v)}"' for k, v in own) + "}"
        return (fld, f"metrics/{target['instance']}/{name}", labels, {"series": fld}, rated)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse(body: str, *, openmetrics: bool, known: dict[str, Series], labeler: Labeler,
          limit: int) -> Parsed:
    """The kept samples of ``body``, in order; raises ExpositionError.

    A line whose metric name (what comes before ``{`` or the value) the filters drop is
    not parsed at all, nor is a line past ``limit`` kept ones: those are only counted. A
    quoted name (``{"name",...}``) is known only once parsed: at most ``limit`` such lines
    are parsed, and the limit is applied again to what the filters keep of them."""
    keep = labeler.keep
    seen: dict[str, Series] = {}
    rows: list[Row | tuple[str, str]] = []  # (series text, line): left to the parser
    unknown: list[str] = []
    stamps: list[float | None] = []  # OpenMetrics: the timestamp of each unknown line
    stamp: float | None = None
    kept = quoted = beyond = 0
    for end, lines in _segments(body):
        for index, line in enumerate(lines):
            if line[:1] in (" ", "\t", "\r"):
                line = line.strip()
            if not line:
                continue
            if line[0] == "#":
                continue
            if openmetrics:
                name = line.partition("{")[0].partition(" ")[0]
                if name and not keep(name):  # before the rewrite: most lines stop here
                    continue
                line, stamp = _openmetrics_line(line)
            brace = line.rfind("}")
            if brace >= 0:
                text, rest = line[:brace + 1], line[brace + 1:]
            elif "\t" in line:  # the format allows tabs between the tokens
                text, _, rest = line.replace("\t", " ").partition(" ")
            else:
                text, _, rest = line.partition(" ")
            series = known.get(text)
            name = ""
            if series is None:
                name = text.partition("{")[0].strip()
                if name and not keep(name):
                    continue
            if name or series is not None:
                if kept >= limit:
                    # the limit is reached: the rest is counted, not read
                    beyond = 1 + _rest(lines, index + 1) + _rest_of(body, end)
                    return _finish(rows, unknown, stamps if openmetrics else None, beyond,
                                   seen, known, labeler, limit)
                kept += 1
            else:
                if quoted >= limit:
                    beyond += 1
                    continue
                quoted += 1
            if (series is not None and not openmetrics and "#" not in rest
                    and "_" not in rest):
                parts = rest.split()
                try:
                    value = float(parts[0])
                    stamp = int(parts[1]) / 1000 if len(parts) == 2 else None
                except (ValueError, IndexError):
                    pass  # the parser says what is wrong
                else:
                    if len(parts) <= 2:
                        seen[text] = series
                        rows.append((series, value, stamp))
                        continue
            rows.append((text, line))
            unknown.append(line)
            if openmetrics:
                stamps.append(stamp)
    if openmetrics and not body.rstrip().endswith("# EOF"):
        raise ExpositionError("invalid exposition text: OpenMetrics body without # EOF")
    return _finish(rows, unknown, stamps if openmetrics else None, beyond, seen, known,
                   labeler, limit)


def _openmetrics_line(line: str) -> tuple[str, float | None]:
    """An OpenMetrics sample line as a text-format one (``name{labels} value``) and its
    timestamp in seconds; its exemplar (`` # {...} v``) is dropped: loopd reads values."""
    cut = line.rfind(" # {")
    if cut >= 0:
        line = line[:cut]
    brace = line.rfind("}")
    if brace >= 0:
        head, tail = line[:brace + 1], line[brace + 1:]
    else:
        head, _, tail = line.partition(" ")
    parts = tail.split()
    if len(parts) != 2:
        return line, None  # no timestamp (or a malformed line: the parser says so)
    try:
        return f"{head} {parts[0]}", float(parts[1])
    except ValueError:
        raise ExpositionError(f"invalid exposition text: bad timestamp in {line[:200]!r}"
                              ) from None


def _segments(body: str) -> Iterator[tuple[int, list[str]]]:
    """The lines of ``body`` a segment of about ``_SEGMENT`` characters at a time, each
    with where the segment ends (the newline after it, or the body's length)."""
    start, size = 0, len(body)
    while start < size:
        end = body.rfind("\n", start, start + _SEGMENT) if start + _SEGMENT < size else size
        if end <= start:  # a line longer than a segment
            end = body.find("\n", start + _SEGMENT)
            if end < 0:
                end = size
        yield end, body[start:end].split("\n")
        start = end + 1


def _rest(lines: list[str], start: int) -> int:
    """The sample lines (not blank, not comments) of ``lines[start:]``."""
    return sum(1 for line in lines[start:] if line.strip()[:1] not in ("", "#"))


def _rest_of(body: str, end: int) -> int:
    """About the sample lines of ``body`` after the newline at ``end``, in C: lines minus
    the comment lines (a blank or indented line is counted as a sample)."""
    if end >= len(body):
        return 0
    lines = body.count("\n", end + 1) + (not body.endswith("\n"))
    return lines - body.count("\n#", end)


def _finish(rows: list[Row | tuple[str, str]], unknown: list[str],
            stamps: list[float | None] | None, beyond: int, seen: dict[str, Series],
            known: dict[str, Series], labeler: Labeler, limit: int) -> Parsed:
    """``Parsed`` of the first pass's ``rows``, the ``unknown`` lines given to the parser;
    ``stamps``: their OpenMetrics timestamps (None for the text format)."""
    if not unknown:
        return Parsed(rows, beyond, seen)  # type: ignore[arg-type]  # every row is a Row
    samples = iter(_samples(text_string_to_metric_families("\n".join(unknown) + "\n")))
    out: list[Row] = []
    unsafe = 0
    index = -1
    for row in rows:
        if len(row) == 3:
            out.append(row)  # a Row
            continue
        index += 1
        sample = next(samples, None)
        if sample is None:  # the parser took a line for no sample at all
            raise ExpositionError(f"invalid exposition text: no sample in {str(row[1])[:200]!r}")
        text = row[0]
        assert isinstance(text, str)
        series = known.get(text)
        if series is None:
            if _UNSAFE.search(sample.name):
                unsafe += 1
                continue
            series = labeler.series(sample)
        if series is None:  # a name the filters drop, written inside the braces
            continue
        if len(out) >= limit:
            beyond += 1
            continue
        if stamps is None:
            seen[text] = series
            when = sample.timestamp  # seconds, a float
        else:  # an OpenMetrics series is parsed every time: its timestamps are not ms
            when = stamps[index]
        out.append((series, float(sample.value), None if when is None else float(when)))
    return Parsed(out, beyond, seen, unsafe)


def _samples(families: Iterable[object]) -> Iterable[Sample]:
    """Every sample of ``families``, the parser's ValueError (and the TypeError or
    IndexError it lets out of some malformed lines) as an ExpositionError."""
    try:
        for family in families:
            yield from family.samples  # type: ignore[attr-defined]
    except (ValueError, TypeError, IndexError) as exc:
        raise ExpositionError(f"invalid exposition text: {str(exc)[:200]}") from None


def rate(last: dict[str, tuple[float, float]], field: str, value: float, now: float
         ) -> float | None:
    """The per-second rate of the counter ``field`` since its previous sample in ``last``
    (updated), None for the first. A value below the previous one is a counter reset: the
    counter restarted from zero, so the increase is the value itself (as Prometheus's
    ``rate``). A value that is not finite is no sample: it is not remembered, or the next
    one would compare with a NaN and count a reset."""
    if not math.isfinite(value):
        return None
    before = last.get(field)
    last[field] = (value, now)
    if before is None or now <= before[1]:
        return None
    increase = value - before[0] if value >= before[0] else value
    return increase / (now - before[1])
