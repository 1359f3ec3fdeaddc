"""Per-round figures -> medians, ratios, targets and the printed table. Pure: no I/O, no clock."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Optional

BASELINE = "none"


@dataclass(frozen=True)
class RoundResult:
    """One configuration measured once: the generator's JSON lines plus what the host did around them."""
    round: int
    position: int            # 0-based place of this configuration in the round's order
    config: str
    busy_before: float       # fraction of all CPUs busy just before the round (other tenants of the machine)
    quiet_wait_s: float      # how long the bench waited for the host to go quiet before the round
    rr: dict
    crr: dict
    listen_overflows: int    # host-wide ListenOverflows delta over the connect run (0 expected)
    agent_cpu_s: Optional[float] = None   # CPU the governing agent used during this configuration's two runs


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    get: Callable[[RoundResult], float]


METRICS = (
    Metric("rr_median_us", "TCP RR 64 B, median", "µs", lambda r: r.rr["median_us"]),
    Metric("rr_p99_us", "TCP RR 64 B, p99", "µs", lambda r: r.rr["p99_us"]),
    Metric("connect_rate", "connect+close rate", "/s", lambda r: r.crr["rate_per_s"]),
    Metric("connect_time_us", "connect+close time", "µs", lambda r: 1e6 / r.crr["rate_per_s"]),
    Metric("connect_median_us", "connect+close, median", "µs", lambda r: r.crr["median_us"]),
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
    of_lower_quartiles: float          # lower_quartile(config) / lower_quartile(reference): a cross-check that
                                       # reads the fast state only (host disturbances only ever slow things down)
    paired: list[float]                # per round: config / reference measured in the same round
    paired_median: float               # median of `paired`: the figure the table and the targets use (it cancels
                                       # the host's drift, which is slower than a round)


@dataclass(frozen=True)
class Target:
    text: str
    metric: str
    config: str
    reference: str
    limit: float

    def ratio(self, ratios: list[Ratio]) -> Optional[Ratio]:
        return next((r for r in ratios if (r.metric, r.config, r.reference) == (self.metric, self.config,
                                                                                   self.reference)), None)


def summarize(results: list[RoundResult], config: str) -> Summary:
    mine = [r for r in results if r.config == config]
    values = {m.key: [m.get(r) for r in mine] for m in METRICS}
    return Summary(config=config, rounds=len(mine),
                   median={k: statistics.median(v) for k, v in values.items()},
                   low={k: min(v) for k, v in values.items()},
                   high={k: max(v) for k, v in values.items()},
                   lower_quartile={k: lower_quartile(v) for k, v in values.items()})


def lower_quartile(values: list[float]) -> float:
    """Nearest-rank 25th percentile (the value itself for one round)."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) // 4) - 1)]


def ratio(results: list[RoundResult], summaries: dict[str, Summary], metric: str, config: str,
          reference: str) -> Ratio:
    get = METRIC[metric].get
    by_round = {(r.round, r.config): get(r) for r in results}
    rounds = sorted({r.round for r in results})
    paired = [by_round[(n, config)] / by_round[(n, reference)] for n in rounds
              if (n, config) in by_round and (n, reference) in by_round]
    return Ratio(metric=metric, config=config, reference=reference,
                 of_medians=summaries[config].median[metric] / summaries[reference].median[metric],
                 of_lower_quartiles=(summaries[config].lower_quartile[metric]
                                     / summaries[reference].lower_quartile[metric]),
                 paired=paired, paired_median=statistics.median(paired) if paired else float("nan"))


def targets(governed: list[str], labels: dict[str, str]) -> list[Target]:
    """RR median <= 1.02x and connect time <= 1.10x of no agent; the largest rule set <= 1.05x of the smallest."""
    out: list[Target] = []
    for c in governed:
        out.append(Target(f"RR median, {labels[c]} ≤ 1.02× no agent", "rr_median_us", c, BASELINE, 1.02))
        out.append(Target(f"connect time, {labels[c]} ≤ 1.10× no agent", "connect_time_us", c, BASELINE, 1.10))
    if len(governed) >= 2:
        small, big = governed[0], governed[-1]
        for metric, what in (("rr_median_us", "RR median"), ("connect_time_us", "connect time")):
            out.append(Target(f"{what}, {labels[big]} ≤ 1.05× {labels[small]}", metric, big, small, 1.05))
    return out


def all_ratios(results: list[RoundResult], summaries: dict[str, Summary], governed: list[str]) -> list[Ratio]:
    pairs = [(c, BASELINE) for c in governed] + ([(governed[-1], governed[0])] if len(governed) >= 2 else [])
    return [ratio(results, summaries, m.key, c, ref) for c, ref in pairs for m in METRICS]


def _fmt(value: float, unit: str) -> str:
    if unit == "/s":
        return f"{value:,.0f}"
    return f"{value:.2f}"


def render_table(summaries: dict[str, Summary], ratios: list[Ratio], order: list[str], labels: dict[str, str]) -> str:
    """Absolute medians [min–max across rounds] per configuration, and the paired-median ratio to no agent."""
    col = 30
    head = f"{'':<30}" + "".join(f"{labels[c]:>{col}}" for c in order)
    lines = [head]
    for m in METRICS:
        row = f"{m.label + ' (' + m.unit + ')':<30}"
        for c in order:
            s = summaries[c]
            cell = f"{_fmt(s.median[m.key], m.unit)} [{_fmt(s.low[m.key], m.unit)}–{_fmt(s.high[m.key], m.unit)}]"
            r = next((x for x in ratios if (x.metric, x.config, x.reference) == (m.key, c, BASELINE)), None)
            if r is not None:
                cell += f" {r.paired_median:.3f}×"
            row += f"{cell:>{col}}"
        lines.append(row)
    return "\n".join(lines)


def render_targets(tgts: list[Target], ratios: list[Ratio]) -> tuple[str, list[dict]]:
    lines, rows = [], []
    for t in tgts:
        r = t.ratio(ratios)
        if r is None:
            continue
        ok = r.paired_median <= t.limit
        spread = f"per round {min(r.paired):.3f}–{max(r.paired):.3f}" if r.paired else ""
        lines.append(f"  {'PASS' if ok else 'MISS'}  {t.text:<42} {r.paired_median:.3f}×   ({spread}; ratio of "
                     f"medians {r.of_medians:.3f}×, of lower quartiles {r.of_lower_quartiles:.3f}×)")
        rows.append({"target": t.text, "limit": t.limit, "paired_median": r.paired_median,
                     "ratio_of_medians": r.of_medians, "ratio_of_lower_quartiles": r.of_lower_quartiles, "pass": ok})
    return "\n".join(lines), rows
