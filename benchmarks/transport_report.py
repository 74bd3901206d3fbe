"""The tables, verdicts and plot of `benchmarks.transport` (the certified bracket against POT)."""

from __future__ import annotations

from typing import Any

from benchmarks import common


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def table(result: dict[str, Any]) -> str:
    header = ["n", "d", "bracket s", "bracket MiB", "width", "upper vs W", "lower vs W", "eps", "upper_bound s",
              "emd2 s", "emd2 MiB", "emd2 / bracket time", 'exact="auto" s (answer)', "emd2 / auto time",
              "POT sinkhorn_log s", "POT MiB", "POT vs W (it)"]
    body = []
    for r in result["rows"]:
        pot = (f"{_pct(r.get('pot_sinkhorn_over_exact_minus_1'))} ({r['pot_sinkhorn_iterations']}"
               f"{'' if r['pot_sinkhorn_converged'] else ', not converged'})" if "pot_sinkhorn_value" in r else "-")
        auto = (f"{common.fmt(r['auto_seconds'])} ({'POT' if r['auto_method'] == 'exact' else 'bracket'})"
                if "auto_seconds" in r else r.get("auto_note", "-"))
        body.append([
            r["n"], r["d"],
            common.fmt(r.get("bracket_seconds")) if "bracket_seconds" in r else r.get("bracket_note", "-"),
            common.fmt(r.get("bracket_rss_peak_extra_mib"), ".0f"),
            _pct(r.get("bracket_relative_width")) .lstrip("+") if "bracket_relative_width" in r else "-",
            _pct(r.get("upper_over_exact_minus_1")), _pct(r.get("lower_over_exact_minus_1")),
            common.fmt(r.get("bracket_eps"), ".2g"), common.fmt(r.get("upper_bound_seconds")),
            common.fmt(r.get("emd2_seconds")) if "emd2_seconds" in r else r.get("emd2_note", "-"),
            common.fmt(r.get("emd2_rss_peak_extra_mib"), ".0f"),
            common.fmt(r.get("emd2_over_bracket_seconds"), ".2f") + ("x" if "emd2_over_bracket_seconds" in r else ""),
            auto, common.fmt(r.get("emd2_over_auto_seconds"), ".2f") + ("x" if "emd2_over_auto_seconds" in r else ""),
            common.fmt(r.get("pot_sinkhorn_seconds")) if "pot_sinkhorn_seconds" in r else r.get("pot_sinkhorn_note", "-"),
            common.fmt(r.get("pot_sinkhorn_rss_peak_extra_mib"), ".0f"), pot,
        ])
    lines = [common.markdown_table(header, body), ""]
    lines.append("MiB: peak resident memory of the solve's process minus its resident memory before the solve. "
                 "vs W: value / exact - 1. width: (upper - lower) / upper of the certified bracket (tol 1%). "
                 'exact="auto": POT where the cost model predicts it faster, else the bracket (its time repeated).')
    lines += [f"- {line}" for line in result["summary"].get("verdicts", [])]
    scale = result.get("scale_up") or []
    if scale:
        device = scale[0].get("device", "cpu")
        lines += ["", f"Scale-up of the bracket alone, {'chunked backend' if device == 'cpu' else 'backend auto on ' + device}, "
                      f"d = {scale[0]['d']} (time budget {result['settings']['scale_seconds']} s per n):", ""]
        rows = [[s["n"], common.fmt(s.get("seconds")) if "seconds" in s else s.get("note"),
                 common.fmt(s.get("rss_peak_extra_mib"), ".0f"), _pct(s.get("relative_width")).lstrip("+") if "relative_width" in s else "-",
                 common.fmt(s.get("converged")), common.fmt(s.get("iterations")), f"{s['tensorized_would_need_gib']:.1f}"]
                for s in scale]
        lines.append(common.markdown_table(
            ["n", "seconds", "peak MiB", "width", "converged", "Sinkhorn updates", "kernel + float64 matrix would need GiB"], rows))
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets: the bracket no slower than emd2 at every n >= 1024, >= 5x faster at
    n = 16384 for d >= 64 and >= 2x at d = 2, its upper end within 1% of exact; peak memory."""
    out = []
    for key, name in (("emd2_over_bracket_seconds", "bracket"), ("emd2_over_auto_seconds", 'exact="auto"')):
        timed = [r for r in rows if r["n"] >= 1024 and key in r]
        if timed:
            slower = [f"n={r['n']} d={r['d']} ({r[key]:.2f}x)" for r in timed if r[key] < 1]
            out.append(f"{name} at least as fast as exact emd2 at every n >= 1024: "
                       + ("met in every configuration" if not slower else "NOT met at " + ", ".join(slower)))
    for r in (r for r in rows if r["n"] >= 16384):
        target = 2 if r["d"] <= 2 else 5
        if "emd2_over_bracket_seconds" in r:
            ratio = r["emd2_over_bracket_seconds"]
            out.append(f"n={r['n']} d={r['d']}: bracket {ratio:.1f}x faster than emd2 (target >= {target}x: "
                       f"{'met' if ratio >= target else 'NOT met'})")
        elif "bracket_seconds" in r and "emd2_timed_out_after" in r:
            out.append(f"n={r['n']} d={r['d']}: bracket {r['bracket_seconds']:.3g} s, emd2 did not finish in "
                       f"{r['emd2_timed_out_after']:.0f} s: the bracket is more than "
                       f"{r['emd2_timed_out_after'] / r['bracket_seconds']:.1f}x faster (target >= {target}x)")
        elif "bracket_seconds" in r:
            out.append(f"n={r['n']} d={r['d']}: bracket {r['bracket_seconds']:.3g} s; emd2 {r.get('emd2_note')}")
    unconverged = [f"n={r['n']} d={r['d']} (width {100 * r['bracket_relative_width']:.1f}%)"
                   for r in rows if "bracket_converged" in r and not r["bracket_converged"]]
    if unconverged:
        out.append("bracket NOT converged to tol 1% within its time budget at " + ", ".join(unconverged)
                   + ": its upper end there is a valid bound, but not a tight one")
    tight = [r for r in rows if "upper_over_exact_minus_1" in r]
    if tight:
        worst = max(tight, key=lambda r: r["upper_over_exact_minus_1"])
        met = "met" if worst["upper_over_exact_minus_1"] <= 0.01 else "NOT met"
        out.append(f"upper end within {100 * worst['upper_over_exact_minus_1']:.2f}% of exact at worst "
                   f"(n={worst['n']} d={worst['d']}; target 1%: {met})")
        also = [r for r in tight if "upper_bound_over_exact_minus_1" in r]
        if also:
            worst_u = max(also, key=lambda r: r["upper_bound_over_exact_minus_1"])
            out.append(f"sinkhorn_upper_bound at defaults within {100 * worst_u['upper_bound_over_exact_minus_1']:.2f}% "
                       f"of exact at worst (n={worst_u['n']} d={worst_u['d']})")
    big = [r for r in rows if r["n"] == max(x["n"] for x in rows) and "bracket_rss_peak_mib" in r]
    if big:
        out.append(f"peak memory at n={big[0]['n']}: bracket " + ", ".join(
            f"d={r['d']} {r['bracket_rss_peak_extra_mib']:.0f} MiB" for r in big) + "; emd2 " + ", ".join(
            f"d={r['d']} {r['emd2_rss_peak_extra_mib']:.0f} MiB" for r in big if "emd2_rss_peak_extra_mib" in r))
    fit = fit_cost_model(rows)
    if fit:
        out.append("cost model fitted to this run (transport.exact.COST_MODEL: D, log A_e, p_e, log A_s, p_s): "
                   + ", ".join(f"({d:g}, {a:.2f}, {p:.3f}, {b:.2f}, {q:.3f})" for d, a, p, b, q in fit))
    return out


def fit_cost_model(rows: list[dict[str, Any]]) -> list[tuple[float, float, float, float, float]]:
    """Per dimension, least-squares fits log t = log A + p log(n^2) of emd2's and the bracket's
    times (rows with n >= 256 and both times): the constants of `transport.exact.COST_MODEL`."""
    import math

    def line(points: list[tuple[float, float]]) -> tuple[float, float]:
        k = len(points)
        mx, my = sum(p[0] for p in points) / k, sum(p[1] for p in points) / k
        slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sum((p[0] - mx) ** 2 for p in points)
        return my - slope * mx, slope

    out = []
    for d in sorted({r["d"] for r in rows}):
        sub = [r for r in rows if r["d"] == d and "emd2_seconds" in r and "bracket_seconds" in r and r["n"] >= 256]
        if len(sub) >= 2:
            log_n = [math.log(r["n"] ** 2) for r in sub]
            exact = line([(u, math.log(r["emd2_seconds"])) for u, r in zip(log_n, sub)])
            bracket = line([(u, math.log(r["bracket_seconds"])) for u, r in zip(log_n, sub)])
            out.append((float(d), *exact, *bracket))
    return out


def plot(result: dict[str, Any], path: str) -> None:
    plt = common.pyplot()
    rows = result["rows"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {2: "C0", 64: "C1", 784: "C2"}
    for d in sorted({r["d"] for r in rows}):
        sub = sorted((r for r in rows if r["d"] == d), key=lambda r: r["n"])
        for key, style, label in (("bracket", "-o", "bracket"), ("emd2", "--s", "emd2"), ("pot_sinkhorn", ":^", "POT sinkhorn_log")):
            pts = [(r["n"], r[f"{key}_seconds"], r[f"{key}_rss_peak_extra_mib"]) for r in sub if f"{key}_seconds" in r]
            if pts:
                ns, ts, ms = zip(*pts)
                ax_t.plot(ns, ts, style, color=colors.get(d), label=f"{label}, d={d}")
                ax_m.plot(ns, ms, style, color=colors.get(d), label=f"{label}, d={d}")
    scale = [s for s in result.get("scale_up") or [] if "seconds" in s]
    if scale:
        ax_t.plot([s["n"] for s in scale], [s["seconds"] for s in scale], "-x", color="k", label=f"bracket chunked, d={scale[0]['d']}")
        ax_m.plot([s["n"] for s in scale], [s["rss_peak_extra_mib"] for s in scale], "-x", color="k",
                  label=f"bracket chunked, d={scale[0]['d']}")
    for ax, ylabel in ((ax_t, "seconds"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (points per cloud)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=6, ncol=2)
    fig.suptitle("W_2^2 between Gaussian clouds: certified bracket (tol 1%) vs POT", fontsize=10)
    common.save_figure(fig, path, dpi=90)
