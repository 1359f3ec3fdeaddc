"""Per-round figures -> medians, paired ratios, targets and the printed tables. Pure: no I/O, no clock."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class RoundResult:
    """One configuration (a path) measured once: the generator's JSON lines plus what the host did around them."""
    round: int
    position: int            # 0-based place of this configuration in the round's order
    config: str
    busy_before: float       # fraction of all CPUs busy just before the round (other tenants of the machine)
    quiet_wait_s: float      # how long the bench waited for the host to go quiet before the round
    rr: Optional[dict]
    crr: Optional[dict]
    bulk: Optional[dict]
    listen_overflows: int    # host-wide ListenOverflows delta over the connect run (0 expected)
    mesh_cpu_s: Optional[float] = None   # CPU of the path's agent or proxy during this path's runs in this round


def _get(kind: str, key: str, scale: float = 1.0) -> Callable[[RoundResult], Optional[float]]:
    def get(r: RoundResult) -> Optional[float]:
        d = getattr(r, kind)
        return None if d is None else d[key] * scale
    return get


def _connect_time(r: RoundResult) -> Optional[float]:
    return None if r.crr is None else 1e6 / r.crr["rate_per_s"]


def _mesh_cpu_ms(r: RoundResult) -> Optional[float]:
    return None if r.mesh_cpu_s is None else r.mesh_cpu_s * 1000


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    get: Callable[[RoundResult], Optional[float]]
    higher_is_better: bool = False


METRICS = (
    Metric("rr_median_us", "TCP RR median", "µs", _get("rr", "median_us")),
    Metric("rr_p99_us", "TCP RR p99", "µs", _get("rr", "p99_us")),
    Metric("connect_rate", "connect+close", "/s", _get("crr", "rate_per_s"), higher_is_better=True),
    Metric("connect_time_us", "connect+close time", "µs", _connect_time),
    Metric("connect_median_us", "connect+close median", "µs", _get("crr", "median_us")),
    Metric("bulk_mb_s", "bulk one way", "MB/s", _get("bulk", "mb_per_s"), higher_is_better=True),
    Metric("mesh_cpu_ms", "mesh process CPU per round", "ms", _mesh_cpu_ms),
)
METRIC = {m.key: m for m in METRICS}


@dataclass(frozen=True)
class Summary:
    config: str
    rounds: int
    median: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]
    lower_quartile: dict[str, float]   # the host's undisturbed state, when at least a quarter of rounds saw it


@dataclass(frozen=True)
class Ratio:
    metric: str
    config: str
    reference: str
    of_medians: float                  # median(config) / median(reference)
    of_lower_quartiles: float          # lower_quartile(config) / lower_quartile(reference): a cross-check
    paired: list[float]                # per round: config / reference measured in the same round
    paired_median: float               # median of `paired`: the figure the tables and the targets use


@dataclass(frozen=True)
class Target:
    text: str
    metric: str
    config: str
    reference: str
    limit: float
    kind: str = "max"                  # "max": ratio <= limit passes; "info": an expectation, printed, not judged

    def ratio(self, ratios: list[Ratio]) -> Optional[Ratio]:
        return next((r for r in ratios if (r.metric, r.config, r.reference) == (self.metric, self.config,
                                                                                   self.reference)), None)


def lower_quartile(values: list[float]) -> float:
    """Nearest-rank 25th percentile (the value itself for one round)."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) // 4) - 1)]


def summarize(results: list[RoundResult], config: str) -> Summary:
    mine = [r for r in results if r.config == config]
    values: dict[str, list[float]] = {}
    for m in METRICS:
        v = [x for x in (m.get(r) for r in mine) if x is not None]
        if v:
            values[m.key] = v
    return Summary(config=config, rounds=len(mine),
                   median={k: statistics.median(v) for k, v in values.items()},
                   low={k: min(v) for k, v in values.items()},
                   high={k: max(v) for k, v in values.items()},
                   lower_quartile={k: lower_quartile(v) for k, v in values.items()})


def ratio(results: list[RoundResult], summaries: dict[str, Summary], metric: str, config: str,
          reference: str) -> Optional[Ratio]:
    get = METRIC[metric].get
    by_round = {(r.round, r.config): get(r) for r in results}
    rounds = sorted({r.round for r in results})
    paired = [by_round[(n, config)] / by_round[(n, reference)] for n in rounds
              if by_round.get((n, config)) is not None and by_round.get((n, reference))]
    s, ref = summaries[config], summaries[reference]
    if metric not in s.median or metric not in ref.median or not paired:
        return None
    return Ratio(metric=metric, config=config, reference=reference,
                 of_medians=s.median[metric] / ref.median[metric],
                 of_lower_quartiles=s.lower_quartile[metric] / ref.lower_quartile[metric],
                 paired=paired, paired_median=statistics.median(paired))


RATIO_METRICS = ("rr_median_us", "rr_p99_us", "connect_rate", "connect_time_us", "connect_median_us", "bulk_mb_s")


def all_ratios(results: list[RoundResult], summaries: dict[str, Summary],
               pairs: list[tuple[str, str]]) -> list[Ratio]:
    """Every ratio metric for every (config, reference) pair that has data."""
    out = []
    for c, ref in pairs:
        for m in RATIO_METRICS:
            r = ratio(results, summaries, m, c, ref)
            if r is not None:
                out.append(r)
    return out


def find(ratios: list[Ratio], metric: str, config: str, reference: str) -> Optional[Ratio]:
    return next((x for x in ratios if (x.metric, x.config, x.reference) == (metric, config, reference)), None)


def fmt(value: Optional[float], unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if unit in ("/s", "MB/s") or value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


@dataclass(frozen=True)
class Column:
    metric: str
    head: str
    width: int = 20


def render_table(summaries: dict[str, Summary], ratios: list[Ratio], order: list[str], labels: dict[str, str],
                 columns: list[Column], reference: str, extra: Optional[dict[str, dict[str, str]]] = None,
                 extra_heads: tuple[tuple[str, int], ...] = ()) -> str:
    """One row per configuration: the median of each metric and, in brackets, its paired-median ratio to
    `reference`; then any extra columns (text already formatted)."""
    label_w = max(len(labels[c]) for c in order) + 2
    head = f"{'':<{label_w}}" + "".join(f"{c.head:>{c.width}}" for c in columns) + \
        "".join(f"{h:>{w}}" for h, w in extra_heads)
    lines = [head]
    for c in order:
        s = summaries[c]
        row = f"{labels[c]:<{label_w}}"
        for col in columns:
            m = METRIC[col.metric]
            cell = fmt(s.median.get(col.metric), m.unit)
            r = find(ratios, col.metric, c, reference) if c != reference else None
            if r is not None:
                cell += f" ({r.paired_median:.2f}×)"
            row += f"{cell:>{col.width}}"
        for h, w in extra_heads:
            row += f"{(extra or {}).get(c, {}).get(h, '–'):>{w}}"
        lines.append(row)
    return "\n".join(lines)


def render_spread(ratios: list[Ratio], order: list[str], labels: dict[str, str], metrics: list[str],
                  reference: str) -> str:
    """Per configuration and metric: min–max over rounds of the paired ratio (how much one round can differ)."""
    label_w = max(len(labels[c]) for c in order) + 2
    lines = [f"{'':<{label_w}}" + "".join(f"{METRIC[m].label + ' (' + METRIC[m].unit + ')':>24}" for m in metrics)]
    for c in order:
        if c == reference:
            continue
        row = f"{labels[c]:<{label_w}}"
        for m in metrics:
            r = find(ratios, m, c, reference)
            row += f"{(f'{min(r.paired):.3f}–{max(r.paired):.3f}' if r else '–'):>24}"
        lines.append(row)
    return "\n".join(lines)


def render_targets(tgts: list[Target], ratios: list[Ratio]) -> tuple[str, list[dict]]:
    """PASS/MISS on the paired median; NOISY when the ratio of lower quartiles (the host's fast state only) gives
    the other verdict; INFO for expectations."""
    lines, rows = [], []
    for t in tgts:
        r = t.ratio(ratios)
        if r is None:
            lines.append(f"  ----  {t.text:<50} (not measured)")
            rows.append({"target": t.text, "limit": t.limit, "kind": t.kind, "paired_median": None, "pass": None})
            continue
        ok = r.paired_median <= t.limit if t.kind == "max" else None
        if ok is not None and (r.of_lower_quartiles <= t.limit) != ok:
            # the paired median and the fast-state estimate disagree: the host was too noisy to tell
            ok = None
            word = "NOISY"
        else:
            word = "PASS" if ok else "MISS" if ok is not None else "INFO"
        spread = f"per round {min(r.paired):.3f}–{max(r.paired):.3f}"
        lines.append(f"  {word:<5} {t.text:<50} {r.paired_median:.3f}×   ({spread}; ratio of medians "
                     f"{r.of_medians:.3f}×, of lower quartiles {r.of_lower_quartiles:.3f}×)")
        rows.append({"target": t.text, "limit": t.limit, "kind": t.kind, "verdict": word,
                     "paired_median": r.paired_median,
                     "paired_min": min(r.paired), "paired_max": max(r.paired),
                     "ratio_of_medians": r.of_medians, "ratio_of_lower_quartiles": r.of_lower_quartiles,
                     "pass": ok})
    return "\n".join(lines), rows


def check(text: str, value: Optional[float], limit: float, unit: str = "") -> tuple[str, dict]:
    """A target on an absolute value (e.g. RSS): value <= limit."""
    if value is None:
        return f"  ----  {text:<50} (not measured)", {"target": text, "limit": limit, "value": None, "pass": None}
    ok = value <= limit
    return (f"  {'PASS' if ok else 'MISS'}  {text:<50} {value:,.1f}{unit}",
            {"target": text, "limit": limit, "value": value, "pass": ok})
