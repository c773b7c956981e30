"""From bench/run.py's raw report: the goals met or missed, the Markdown summary, the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

MB = 1_000_000
MIB = 1024 * 1024
FLAT = 0.05
"""RSS is flat when its fitted growth over the run's second half is under 5 % of its max."""


def _get(report: dict[str, Any], *path: str) -> Any:
    value: Any = report.get("scenarios", {})
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals (and the "a hung neighbour" contract), each with what was measured
    and whether it was met (None: not measured in this run)."""
    out = []

    def goal(name: str, target: str, measured: Any, met: bool | None, note: str = "") -> None:
        out.append(
            {
                "goal": name,
                "target": target,
                "measured": measured,
                "met": met,
                "note": note,
            }
        )

    ratio = _get(report, "throughput", "ratio")
    at_top = _get(report, "throughput", "at_top") or {}
    ceiling = _get(report, "throughput", "ceiling") or {}
    met = None if ratio is None else ratio >= 0.5
    note = ""
    if at_top.get("mosquitto_sub"):
        note = "mosquitto_sub held the highest rate offered: the ratio is an upper bound"
    if ratio is None and ceiling.get("mosquitto_sub"):
        met, note = False, "ingestd held none of the rates offered (lower --rates to measure)"
    goal("zero-loss ceiling vs mosquitto_sub", ">= 0.5", ratio, met, note)
    proxy = _get(report, "prototype", "ratio_proxy")
    met = None if proxy is None else proxy >= 100
    note = "the prototype drained a backlog alone, its best case: the ratio is a lower bound"
    if proxy is None and _get(report, "prototype", "ingestd_proxy_steps"):
        met, note = False, "ingestd behind the proxy held none of the rates tried"
    goal("ingestd / prototype design, 50 ms round trip", ">= 100", proxy, met, note)
    p99 = _get(report, "latency", "tsdb", "mqtt_via_ingestd_ms", "p99")
    goal(
        "publish to visible in TSDB, p99 (ms)",
        "< 2000",
        p99,
        None if p99 is None else p99 < 2000,
        "includes VictoriaMetrics' own delay (direct_write_ms)",
    )
    p99 = _get(report, "latency", "alert", "ms", "p99")
    goal("reading to alert event, p99 (ms)", "< 50", p99, None if p99 is None else p99 < 50)
    top = _get(report, "memory", "rss_max_mib")
    goal(
        "RSS max at 10,000 devices (MiB)",
        "< 200 MB (190.7 MiB)",
        top,
        None if top is None else top * MIB < 200 * MB,
    )
    growth = _get(report, "memory", "last_half_growth_mib")
    goal(
        "RSS flat after warm-up: fitted growth over the second half (MiB)",
        f"< {FLAT:.0%} of max",
        growth,
        None if growth is None or top is None else growth < FLAT * top,
    )
    healthy = _get(report, "hang", "healthy", "step")
    hung = _get(report, "hang", "hung", "step")
    hang_ratio = _get(report, "hang", "ratio")
    goal(
        "ingest throughput with a hung channel / healthy",
        ">= 0.95, and holds if healthy holds",
        hang_ratio,
        None
        if hang_ratio is None or healthy is None or hung is None
        else hang_ratio >= 0.95 and (hung["holds"] or not healthy["holds"]),
    )
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _step_rows(steps: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| offered msg/s | consumer | published | received/stored | missing | seconds "
        "| achieved msg/s | publisher msg/s | holds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        rows.append(
            f"| {s['offered_rate']:,.0f} | {s['consumer']} | {s['published']:,} "
            f"| {s['received']:,} | {s['missing']:,} | {s['seconds']:.2f} "
            f"| {s['achieved_rate']:,} | {s['publisher_rate']:,} "
            f"| {_fmt(s.get('holds'))} |"
        )
    return rows


def summary(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        f"# ingestd benchmark, {report['started']} ({report['mode']})",
        "",
        f"{m['cores']} x {m['cpu_model']}, {m['memory_mib']:,} MiB, {m['os']}, kernel "
        f"{m['kernel']}; Python {m['python']}, ingestd {m['ingestd']}, mosquitto "
        f"{m['mosquitto']}, VictoriaMetrics {m['victoria_metrics']}. Load average at start "
        f"{m['loadavg_at_start'][0]:.2f}, at end {report['loadavg_at_end'][0]:.2f} "
        f"(above {m['cores']}: the figures were taken under contention). "
        f"{report['wall_seconds']:.0f} s.",
        "",
        f"Publishers ({report['plan']['publishers']} processes, {report['plan']['devices']:,} "
        "devices, QoS 1, JSON with 5 fields + seq), broker, consumer and VictoriaMetrics share "
        "the machine's cores, as on a farm gateway. ingestd runs with its spool, a quota rule "
        "every device matches and none exceeds, and 100 alert rules (+1 probe rule).",
        "",
        "## Goals",
        "",
        "| goal | target | measured | met |",
        "|---|---|---:|---|",
    ]
    for g in report["goals"]:
        met = {True: "yes", False: "**NO**", None: "not measured"}[g["met"]]
        note = f" ({g['note']})" if g["note"] and g["met"] is not None else ""
        out.append(f"| {g['goal']}{note} | {g['target']} | {_fmt(g['measured'])} | {met} |")
    scenarios = report["scenarios"]
    if "ceiling_used" in report:
        used = report["ceiling_used"]
        out += ["", f"Scenarios 2-5 are sized from ingestd's ceiling {used['rate']:,.0f} msg/s "
                f"({used['from']})."]  # fmt: skip

    tp = scenarios.get("throughput")
    if tp:
        best = tp["ceiling"]
        out += ["", "## 1. Throughput ceiling (zero loss, QoS 1)", "", *_step_rows(tp["steps"])]
        held = ", ".join(f"{name} {_fmt(rate)}" for name, rate in best.items())
        out += [
            "",
            f"Highest holding rate (msg/s): {held}; ingestd / mosquitto_sub = "
            f"{_fmt(tp['ratio'], 2)}.",
        ]
        for name, top in tp["at_top"].items():
            if top:
                out.append(
                    f"{name} held the highest rate offered: its ceiling is higher (raise --rates)."
                )
        for s in tp["steps"]:
            if s["publisher_rate"] < report["hold_fraction"] * s["offered_rate"]:
                out.append(
                    f"At {s['offered_rate']:,.0f} msg/s ({s['consumer']}) the publishers reached "
                    f"only {s['publisher_rate']:,} msg/s: that rate was not really offered."
                )

    proto = scenarios.get("prototype")
    if proto:
        out += [
            "",
            "## 2. The prototype's design (one synchronous write per message)",
            "",
            "| consumer | TSDB | backlog at start | written msg/s | backlog left "
            "| ingestd's rate | ingestd / prototype |",
            "|---|---|---:|---:|---|---:|---:|",
        ]
        for where, label, ingestd, ratio in [
            ("direct", "loopback", proto["ingestd_direct_ceiling"], proto["ratio_direct"]),
            (
                "proxy",
                f"+{proto['proxy_round_trip_ms']:.0f} ms round trip",
                proto["ingestd_proxy_ceiling"],
                proto["ratio_proxy"],
            ),
        ]:
            s = proto[f"prototype_{where}"]
            out.append(
                f"| prototype | {label} | {s['backlog_at_start']:,} | {s['achieved_rate']:,} "
                f"| {_fmt(s['saturated'])} | {_fmt(ingestd, 0)} | {_fmt(ratio)} |"
            )
        out += ["", "ingestd behind the proxy:", "", *_step_rows(proto["ingestd_proxy_steps"])]
        for where in ("direct", "proxy"):
            s = proto[f"prototype_{where}"]
            if not s["saturated"]:
                out.append(
                    f"\nThe prototype ({where}) emptied its backlog within the window: its "
                    "rate is a lower bound, and the ratio an upper bound (raise --prototype-rate)."
                )

    lat = scenarios.get("latency")
    if lat:
        tsdb, alert = lat["tsdb"], lat["alert"]
        rows = [
            ("publish -> visible in VictoriaMetrics, via ingestd", tsdb["mqtt_via_ingestd_ms"]),
            ("write -> visible, straight to VictoriaMetrics", tsdb["direct_write_ms"]),
            ("reading published -> alert event received", alert["ms"]),
            ("ingestd_lag_seconds (group commit -> TSDB accepted)", lat["daemon_lag_ms"]),
        ]
        out += [
            "",
            f"## 3. Latency at {lat['fraction_of_ceiling']:.0%} of the ceiling "
            f"({lat['offered_rate']:,.0f} msg/s background, kept up: {_fmt(lat['kept_up'])})",
            "",
            "| path | samples | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, p in rows:
            out.append(
                f"| {label} | {p['count']} | {_fmt(p['p50'])} | {_fmt(p['p99'])} "
                f"| {_fmt(p['max'])} |"
            )
        missing = {**tsdb["missing"], "alert": alert["missing"]}
        if any(missing.values()):
            out.append(f"\nProbes never seen: {missing}.")

    mem = scenarios.get("memory")
    if mem:
        run = mem["run"]
        out += [
            "",
            f"## 4. Memory ({run['published']:,} messages from {mem['devices']:,} devices at "
            f"{mem['offered_rate']:,.0f} msg/s)",
            "",
            f"RSS start {_fmt(mem['rss_start_mib'])} MiB, max {_fmt(mem['rss_max_mib'])} MiB "
            f"(VmHWM {_fmt(run['hwm_mib'])}), final {_fmt(run['rss_final_mib'])} MiB; slope over "
            f"the second half {_fmt(mem['slope_mib_per_100k'], 3)} MiB per 100k readings "
            f"(fitted growth {_fmt(mem['last_half_growth_mib'], 2)} MiB). Kept up: "
            f"{_fmt(run['holds'])} ({run['achieved_rate']:,} msg/s, {run['missing']:,} missing).",
        ]

    hg = scenarios.get("hang")
    if hg:
        out += [
            "",
            f"## 5. A notification channel that hangs ({hg['offered_rate']:,.0f} msg/s offered)",
            "",
            "| channel | achieved msg/s | holds | missing | requests / answered "
            "| notifications sent | pending at end | alert p50 / p99 ms |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for state in ("healthy", "hung"):
            h = hg[state]
            s, n, a = h["step"], h["notifications"], h["alert"]["ms"]
            sent = sum(v for k, v in n.items() if k.startswith("notifications_sent"))
            pending = sum(v for k, v in n.items() if k.startswith("notifications_pending"))
            out.append(
                f"| {state} | {s['achieved_rate']:,} | {_fmt(s['holds'])} | {s['missing']:,} "
                f"| {h['webhook']['requests']} / {h['webhook']['answered']} | {sent:,.0f} "
                f"| {pending:,.0f} | {_fmt(a['p50'])} / {_fmt(a['p99'])} |"
            )
        out.append(f"\nhung / healthy: {_fmt(hg['ratio'], 3)}.")

    out += _profile(report)
    problems = []
    for name, error in report["errors"].items():
        problems.append(f"- scenario {name} failed: `{error.strip().splitlines()[-1][:300]}`")
    for s in _daemon_steps(report):
        if s.get("log_lines"):
            problems.append(
                f"- ingestd ({s['consumer']}, {s['offered_rate']:,.0f} msg/s) logged "
                f"{s['log_lines']} warning/error line(s), e.g. `{s['log_sample'][0][:300]}`"
            )
        if s.get("duplicates"):
            problems.append(
                f"- VictoriaMetrics holds {s['duplicates']:,} readings twice from "
                f"{s['consumer']} at {s['offered_rate']:,.0f} msg/s (a retried write)."
            )
    if problems:
        out += ["", "## Problems seen", "", *problems]
    files = report.get("files", {})
    if files:
        out += ["", "Files: " + ", ".join(f"`{f}`" for f in files.values())]
    return "\n".join(out)


def _profile(report: dict[str, Any]) -> list[str]:
    """Where ingestd's time went (``--profile``): in its highest step of scenario 1, and in
    the latency run (alert transitions beside the load)."""
    steps = [s for s in _get(report, "throughput", "steps") or [] if s.get("profile")]
    mine = [s for s in steps if s["consumer"] == "ingestd"] or steps
    chosen = [("scenario 1", mine[-1])] if mine else []
    background = _get(report, "latency", "background")
    if background and background.get("profile"):
        chosen.append(("scenario 3", background))
    out: list[str] = []
    for where, step in chosen:
        profile = step["profile"]
        if "error" in profile:
            out += ["", f"py-spy failed ({where}): {profile['error']}"]
            continue
        out += [
            "",
            f"## Where ingestd's time goes ({where}: {step['consumer']} at "
            f"{step['offered_rate']:,.0f} msg/s, {profile['samples']:,} py-spy samples, "
            f"`{profile['file']}`)",
            "",
            "| innermost ingestd module on the stack | % | library of the innermost frame | % |",
            "|---|---:|---|---:|",
        ]
        modules, libraries = profile["by_ingestd_module_percent"], profile["by_library_percent"]
        for i in range(max(len(modules), len(libraries))):
            m = modules[i] if i < len(modules) else ("", "")
            lib = libraries[i] if i < len(libraries) else ("", "")
            out.append(f"| {m[0]} | {m[1]} | {lib[0]} | {lib[1]} |")
        out += ["", "| function (self time) | % |", "|---|---:|"]
        out += [f"| `{name}` | {share} |" for name, share in profile["top_functions_percent"]]
    return out


def _daemon_steps(report: dict[str, Any]) -> list[dict[str, Any]]:
    s = report["scenarios"]
    steps = list(_get(report, "throughput", "steps") or [])
    steps += _get(report, "prototype", "ingestd_proxy_steps") or []
    steps += [
        x for x in (_get(report, "latency", "background"), _get(report, "memory", "run")) if x
    ]
    for state in ("healthy", "hung"):
        if s.get("hang"):
            steps.append(s["hang"][state]["step"])
    return [step for step in steps if "log_lines" in step]


def plots(report: dict[str, Any], out: Path, stem: str) -> dict[str, str]:
    """PNGs of what this run measured: throughput vs offered rate, the RSS curve, latency
    histograms. Returns {plot: file name}."""
    files: dict[str, str] = {}
    for name, draw in [
        ("throughput", _throughput),
        ("rss", _rss),
        ("latency", _latency),
    ]:
        figure = draw(report)
        if figure is not None:
            path = out / f"{stem}-{name}.png"
            figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(figure)
            files[f"{name}_png"] = path.name
    return files


def _throughput(report: dict[str, Any]) -> Any:
    steps = list(_get(report, "throughput", "steps") or [])
    steps += _get(report, "prototype", "ingestd_proxy_steps") or []
    if not steps:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for consumer in dict.fromkeys(s["consumer"] for s in steps):
        mine = [s for s in steps if s["consumer"] == consumer]
        (line,) = axes.plot(
            [s["offered_rate"] for s in mine],
            [s["achieved_rate"] for s in mine],
            marker="o",
            label=consumer,
        )
        failed = [s for s in mine if not s["holds"]]
        axes.scatter(
            [s["offered_rate"] for s in failed],
            [s["achieved_rate"] for s in failed],
            marker="x",
            s=80,
            color=line.get_color(),
        )
    top = max(s["offered_rate"] for s in steps)
    axes.plot([0, top], [0, top], color="grey", linestyle=":", label="achieved = offered")
    for where, style in (("direct", "--"), ("proxy", "-.")):
        proto = _get(report, "prototype", f"prototype_{where}")
        if proto:
            axes.axhline(
                proto["achieved_rate"],
                color="black",
                linestyle=style,
                label=f"prototype design, {where}: {proto['achieved_rate']:,} msg/s",
            )
    axes.set_xlabel("offered rate (msg/s)")
    axes.set_ylabel("achieved rate (msg/s), x: did not hold")
    axes.set_title("Throughput, QoS 1, zero loss")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return figure


def _rss(report: dict[str, Any]) -> Any:
    curve = _get(report, "memory", "curve")
    if not curve:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([n for _, n, _ in curve], [rss for *_, rss in curve], marker=".")
    axes.axhline(200 * MB / MIB, color="red", linestyle="--", label="goal: 200 MB")
    axes.set_xlabel("readings written")
    axes.set_ylabel("ingestd RSS (MiB)")
    axes.set_ylim(bottom=0)
    axes.set_title(f"ingestd RSS, {_get(report, 'memory', 'devices'):,} devices")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return figure


def _latency(report: dict[str, Any]) -> Any:
    lat = _get(report, "latency")
    if not lat:
        return None
    samples = lat["tsdb"]["samples_ms"]
    visible = {"via ingestd": samples["mqtt"], "written directly": samples["direct"]}
    panels = [
        ("publish -> visible in VictoriaMetrics", visible, 2000),
        ("reading -> alert event", {"via ingestd": lat["alert"]["samples_ms"]}, 50),
        (
            "ingestd_lag_seconds samples",
            {"commit -> accepted": lat["daemon_lag_ms"]["samples"]},
            None,
        ),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (title, series, goal) in zip(axes, panels, strict=True):
        every = [x for values in series.values() for x in values]
        if every:  # the same bins for every series of a panel
            low, high = min(every), max(every)
            bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 30
        for label, values in series.items():
            if values:
                ax.hist(values, bins=bins, alpha=0.6, label=f"{label} ({len(values)})")
        if goal:
            ax.axvline(goal, color="red", linestyle="--", label=f"goal p99 < {goal} ms")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("ms")
        ax.legend(fontsize="x-small")
    axes[0].set_ylabel("samples")
    return figure
