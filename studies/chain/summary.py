"""From the runs of the chain study to one row per configuration: mean and spread over seeds,
ratios to W_c, and per inequality of the chain the seeds where it held and the mean margin."""

from __future__ import annotations

import math
import statistics
from typing import Any

from studies.chain.settings import RUNNING_COLUMNS

CHAIN_COLUMNS = ["dual_raw", "dual_cert", "primal_mc", "primal_mc_more", "primal_critic", "w_exact", "w_lower",
                 "w_upper", "w_large", "w_floor"]
DIAGNOSTIC_COLUMNS = [*(key + "_running" for key in RUNNING_COLUMNS), "lipschitz_bound", "critic_slope_median", "recon",
                      "divergence_mc", "divergence_mc_more", "divergence_critic", "encoder_sigma_median",
                      "primal_mc_se", "dual_raw_se", "dual_cert_se", "encoder_best_step"]
# (name, larger side, smaller side): "smaller <= larger" is checked per seed
INEQUALITIES = [
    ("dual_cert<=W_c", "w_exact", "dual_cert"),
    ("dual_raw<=W_c", "w_exact", "dual_raw"),
    ("dual_cert<=primal_MC", "primal_mc", "dual_cert"),
    ("dual_raw<=primal_MC", "primal_mc", "dual_raw"),
    ("dual_raw<=primal_critic", "primal_critic", "dual_raw"),
    ("primal_MC<=W_c", "w_exact", "primal_mc"),
    ("primal_MC16k<=W_c", "w_exact", "primal_mc_more"),
    ("primal_critic<=W_c", "w_exact", "primal_critic"),
    ("W_c<=upper", "w_upper", "w_exact"),
    ("lower<=W_c", "w_exact", "w_lower"),
]


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation over seeds; nan for one seed)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def pm(mean: float, sd: float, spec: str = ".3f") -> str:
    """mean ± sd (sd left out for one seed); values of 10^4 and more in scientific notation."""
    if math.isnan(mean):
        return "-"
    spec = ".2e" if abs(mean) >= 1e4 else spec
    return format(mean, spec) if math.isnan(sd) else f"{format(mean, spec)} ± {format(sd, spec)}"


def summarize(results: list[dict]) -> list[dict]:
    """One row per (dataset, divergence, lambda) of the grid: mean and spread over seeds, ratios to
    W_c, and per inequality the number of seeds where it held and the mean margin (larger - smaller)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r["grid"]:
            groups.setdefault((r["dataset"], r["divergence"], r["lambda"]), []).append(r["final"])
    rows = []
    for (dataset, divergence, lam), finals in groups.items():
        row: dict[str, Any] = {"dataset": dataset, "divergence": divergence, "lambda": lam, "seeds": len(finals)}
        for key in CHAIN_COLUMNS + DIAGNOSTIC_COLUMNS:
            row[key], row[key + "_sd"] = spread([f.get(key, math.nan) for f in finals])
        for key in ("dual_cert", "dual_raw", "primal_mc", "primal_mc_more", "primal_critic", "primal_mc_running",
                    "primal_mc_more_running"):
            row[key + "_over_w"], row[key + "_over_w_sd"] = spread([f.get(key, math.nan) / f["w_exact"] for f in finals])
            row[key + "_over_w_large"], row[key + "_over_w_large_sd"] = spread(
                [f.get(key, math.nan) / f.get("w_large", math.nan) for f in finals])
        for name, larger, smaller in INEQUALITIES:
            margins = [f[larger] - f[smaller] for f in finals if math.isfinite(f[larger] - f[smaller])]
            row[f"held[{name}]"] = f"{sum(m >= 0 for m in margins)}/{len(margins)}" if margins else "-"
            row[f"margin[{name}]"] = statistics.fmean(margins) if margins else math.nan
        # primal - dual in standard errors (the two estimates use independent draws)
        row["z[primal_MC-dual_raw]"] = statistics.fmean(
            (f["primal_mc"] - f["dual_raw"]) / math.hypot(f["primal_mc_se"], f["dual_raw_se"]) for f in finals)
        rows.append(row)
    rows.sort(key=lambda r: (r["dataset"], r["divergence"], r["lambda"]))
    return rows


def generator_rows(results: list[dict]) -> list[dict]:
    """W_c to held-out data per (dataset, model), mean over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r["kind"] == "sinkhorn":
            label = "SinkhornGenerator (entropic OT, c = l2)"
        elif r["divergence"] == r["compare_divergence"] and r["lambda"] == r["compare_lambda"]:
            label = {1.0: "PrimalDual alpha=1 (f-WAE)", 0.0: "PrimalDual alpha=0 (Lipschitz f-GAN)"}.get(
                r["alpha"], f"PrimalDual alpha={r['alpha']:g} (hybrid)")
        else:
            continue
        groups.setdefault((r["dataset"], label), []).append(r)
    rows = []
    for (dataset, label), rs in sorted(groups.items()):
        row = {"dataset": dataset, "model": label, "seeds": len(rs), "batches": rs[0]["batches"]}
        for key in ("w_exact", "w_lower", "w_upper"):
            row[key], row[key + "_sd"] = spread([r["final"][key] for r in rs])
        rows.append(row)
    return rows
