"""The figures of the chain study: the chain over training per configuration, and the chain
relative to W_c against lambda."""

from __future__ import annotations

from benchmarks import common


def plot_curves(results: list[dict], dataset: str, path: str) -> None:
    """One panel per (divergence, lambda): the chain over training (first seed)."""
    plt = common.pyplot()
    runs = [r for r in results if r["grid"] and r["dataset"] == dataset and r["history"] and r["seed"] == r["first_seed"]]
    divergences = sorted({r["divergence"] for r in runs})
    lambdas = sorted({r["lambda"] for r in runs})
    if not runs:
        return
    fig, axes = plt.subplots(len(divergences), len(lambdas), figsize=(3.6 * len(lambdas), 3.0 * len(divergences)),
                             squeeze=False)
    for r in runs:
        ax = axes[divergences.index(r["divergence"])][lambdas.index(r["lambda"])]
        h = r["history"]
        epochs = [row["epoch"] for row in h]
        ax.fill_between(epochs, [row["w_lower"] for row in h], [row["w_upper"] for row in h], color="0.8",
                        label="bracket [lower, upper]")
        ax.plot(epochs, [row["w_exact"] for row in h], "k-", label="W_c exact")
        ax.plot(epochs, [row["primal_mc"] for row in h], "C0-o", ms=3, label="primal (MC)")
        ax.plot(epochs, [row["primal_critic"] for row in h], "C0--", label="primal (critic)")
        ax.plot(epochs, [row["dual_raw"] for row in h], "C3-o", ms=3, label="dual (raw)")
        ax.plot(epochs, [row["dual_cert"] for row in h], "C3--", label="dual (certified)")
        final, last = r["final"], epochs[-1] + 0.25
        ax.plot([last], [final["dual_raw"]], "C3*", ms=8, label="dual (raw) after critic refinement")
        ax.plot([last], [final["dual_cert"]], "C1*", ms=6, label="dual (cert.) after critic refinement")
        top = max(max(row["w_upper"] for row in h), max(row["dual_raw"] for row in h), final["dual_raw"])
        ax.set_ylim(min(0.0, min(row["dual_cert"] for row in h)), 2.0 * top)  # a huge primal would hide the rest
        ax.set_title(f"{dataset}, {r['divergence']}, lambda={r['lambda']:g}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat:
        if not ax.has_data():
            ax.axis("off")
    next(ax for ax in axes.flat if ax.has_data()).legend(fontsize=6, loc="upper left")
    common.save_figure(fig, path, dpi=80)


def plot_lambda(rows: list[dict], path: str) -> None:
    """dual / W_c and primal / W_c against lambda, per dataset and divergence."""
    plt = common.pyplot()
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.0), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for k, divergence in enumerate(sorted({r["divergence"] for r in rows if r["dataset"] == dataset})):
            rs = sorted((r for r in rows if r["dataset"] == dataset and r["divergence"] == divergence),
                        key=lambda r: r["lambda"])
            lams = [r["lambda"] for r in rs]
            ax.errorbar(lams, [r["dual_cert_over_w"] for r in rs], yerr=[r["dual_cert_over_w_sd"] for r in rs],
                        color=f"C{k}", marker="o", linestyle="-", label=f"{divergence}: dual (cert) / W_c")
            ax.errorbar(lams, [r["primal_mc_over_w"] for r in rs], yerr=[r["primal_mc_over_w_sd"] for r in rs],
                        color=f"C{k}", marker="s", linestyle="--", label=f"{divergence}: primal (MC) / W_c")
            ax.errorbar(lams, [r["primal_critic_over_w"] for r in rs], yerr=[r["primal_critic_over_w_sd"] for r in rs],
                        color=f"C{k}", marker="^", linestyle=":", label=f"{divergence}: primal (critic) / W_c")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(0.01, 100.0)  # the Monte Carlo primal can be astronomically large: clipped
        ax.set_xlabel("lambda")
        ax.set_title(f"{dataset}: the chain relative to W_c(held-out, samples)", fontsize=9)
        ax.legend(fontsize=6)
    common.save_figure(fig, path, dpi=80)
