"""A scraped ``/metrics`` body as samples: prometheus-client parses, loopd remembers.

Every series is parsed by prometheus-client (``prometheus_client.parser`` for the text
format, ``prometheus_client.openmetrics.parser`` for OpenMetrics): loopd has no parser of
its own. What it adds is memory, because a target exposes the same series every scrape
and only their values change: a text-format line whose series part (everything before the
value: ``name{labels}``) was parsed in the previous scrape of that target is not parsed
again; its value (and timestamp) are read with ``float``/``int``, and anything unusual
about them (an ``_``, a third field, an exemplar) sends the line to the parser after all.
This is what keeps a round of 100,000 samples under a second of CPU (benchmarks/scrape.py).
OpenMetrics bodies are parsed whole every time (they are rarer, and end with ``# EOF``).

Comment lines (``# HELP``, ``# TYPE``) are skipped: loopd reads sample names, not types,
so a histogram's ``_bucket`` samples are samples like any other.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

TARGET_LABELS = ("instance", "job")


class ExpositionError(ValueError):
    """The body is not valid exposition text; the message says where."""


def name_filter(allow: list[str], deny: list[str]) -> Callable[[str], bool]:
    """Whether a metric name is kept: it matches an ``allow`` glob (or ``allow`` is empty)
    and no ``deny`` glob. Compiled once; answers are remembered per name."""
    def union(globs: list[str]) -> re.Pattern[str] | None:
        return re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None

    allowed, denied = union(allow), union(deny)
    known: dict[str, bool] = {}

    def keep(name: str) -> bool:
        answer = known.get(name)
        if answer is None:
            answer = known[name] = (allowed is None or allowed.match(name) is not None) and (
                denied is None or denied.match(name) is None)
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
    """What ``parse`` made of a body: the kept ``rows`` (at most ``limit``), how many kept
    lines came ``beyond`` the limit, and the series ``seen`` (the next scrape's ``known``)."""

    rows: list[Row]
    beyond: int
    seen: dict[str, Series]


@dataclass(slots=True)
class Labeler:
    """Builds a target's ``Series`` from prometheus-client samples: its filters, its target
    labels and ``honor_labels`` (as Prometheus: by default an exposed ``instance`` or
    ``job`` is kept as ``exported_instance``/``exported_job`` and the target's win; with
    ``honor_labels`` the exposed ones win)."""

    keep: Callable[[str], bool]
    rate: Callable[[str], bool]
    target_labels: dict[str, str]
    honor_labels: bool

    def series(self, sample: Sample) -> Series | None:
        """The series of ``sample``, None when the filters drop its name."""
        name = sample.name
        if not self.keep(name):
            return None
        labels = dict(sample.labels)
        for label, value in self.target_labels.items():
            if label not in labels:
                labels[label] = value
            elif not self.honor_labels:
                labels[f"exported_{label}"] = labels[label]
                labels[label] = value
        own = sorted((k, v) for k, v in labels.items() if k not in TARGET_LABELS)
        fld = name if not own else name + "{" + ",".join(
            f'{k}="{_escape(v)}"' for k, v in own) + "}"
        return (fld, f"metrics/{labels['instance']}/{name}", labels, {"series": fld},
                self.rate(name))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse(body: str, *, openmetrics: bool, known: dict[str, Series], labeler: Labeler,
          limit: int) -> Parsed:
    """The kept samples of ``body``, in order; raises ExpositionError.

    A line whose metric name (what comes before ``{`` or the value) the filters drop is
    not parsed at all, nor is a line past ``limit`` kept ones: those are only counted."""
    if openmetrics:
        return _parse_whole(body, labeler, limit)
    keep = labeler.keep
    seen: dict[str, Series] = {}
    rows: list[Row | tuple[str, str]] = []  # (series text, line): left to the parser
    unknown: list[str] = []
    beyond = 0
    for line in body.split("\n"):
        if line[:1] in (" ", "\t", "\r"):
            line = line.strip()
        if not line or line[0] == "#":
            continue
        end = line.rfind("}")
        if end >= 0:
            text, rest = line[:end + 1], line[end + 1:]
        else:
            text, _, rest = line.partition(" ")
        series = known.get(text)
        if series is None:
            name = text.partition("{")[0].strip()
            if name and not keep(name):
                continue
        if len(rows) >= limit:
            beyond += 1
            continue
        if series is not None and "#" not in rest and "_" not in rest:
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
    if not unknown:
        return Parsed(rows, beyond, seen)  # type: ignore[arg-type]  # every row is a Row
    samples = iter(_samples(text_string_to_metric_families("\n".join(unknown) + "\n")))
    out: list[Row] = []
    for row in rows:
        if len(row) == 3:
            out.append(row)  # a Row
            continue
        sample = next(samples, None)
        if sample is None:  # the parser took a line for no sample at all
            raise ExpositionError(f"invalid exposition text: no sample in {str(row[1])[:200]!r}")
        text = row[0]
        assert isinstance(text, str)
        series = known.get(text) or labeler.series(sample)
        if series is None:  # a name the filters drop, written inside the braces
            continue
        seen[text] = series
        when = sample.timestamp  # seconds (a float) in the text format
        out.append((series, float(sample.value), None if when is None else float(when)))
    return Parsed(out, beyond, seen)


def _parse_whole(body: str, labeler: Labeler, limit: int) -> Parsed:
    by_key: dict[tuple[str, tuple[tuple[str, str], ...]], Series | None] = {}
    rows: list[Row] = []
    beyond = 0
    for sample in _samples(openmetrics_families(body)):  # type: ignore[no-untyped-call]
        ident = (sample.name, tuple(sorted(sample.labels.items())))
        if ident in by_key:
            series = by_key[ident]
        else:
            series = by_key[ident] = labeler.series(sample)
        if series is None:
            continue
        if len(rows) >= limit:
            beyond += 1
            continue
        om_stamp = sample.timestamp  # a Timestamp in OpenMetrics: float() gives its seconds
        rows.append((series, float(sample.value),
                     None if om_stamp is None else float(om_stamp)))
    return Parsed(rows, beyond, {})


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
    ``rate``)."""
    before = last.get(field)
    last[field] = (value, now)
    if before is None or now <= before[1]:
        return None
    increase = value - before[0] if value >= before[0] else value
    return increase / (now - before[1])
