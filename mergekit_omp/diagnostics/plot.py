"""A PNG of the audit: base-row norms, donor residuals, donor z against base z.

Needs matplotlib (``pip install 'mergekit-omp[plot]'``); without it ``require_matplotlib``
raises a TransplantError that says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from mergekit_omp.diagnostics.audit import RowAudit, token_text
from mergekit_omp.errors import TransplantError
from mergekit_omp.vocabulary import Vocabulary

LABELLED = 8
FLAGGED_COLOR = "tab:red"


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a TransplantError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise TransplantError(
            "--plot needs matplotlib: pip install 'mergekit-omp[plot]' (or matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labelled_positions(audit: RowAudit) -> list[int]:
    flagged = audit.flagged.nonzero().flatten()
    order = torch.argsort(audit.base_z[flagged], descending=True)
    return flagged[order][:LABELLED].tolist()


def _norm_panel(ax: Any, audit: RowAudit, vocabulary: Vocabulary) -> None:
    real = audit.real_norms.clamp(min=1e-12)
    new = audit.base_norm.clamp(min=1e-12)
    low = float(torch.cat([real, new]).min())
    high = max(float(real.max()), float(new.max()), audit.bound)
    bins = torch.logspace(math.log10(low), math.log10(high * 1.05), 80).numpy()
    ax.hist(real.numpy(), bins=bins, alpha=0.5, label=f"real base rows ({len(real)})")
    ax.hist(new.numpy(), bins=bins, alpha=0.5, label=f"approximated ({len(new)})")
    ax.axvline(audit.bound, color="black", linestyle="--", label=f"bound {audit.bound:.3g}")
    for position in _labelled_positions(audit):
        value = float(audit.base_norm[position])
        ax.axvline(value, color=FLAGGED_COLOR, linewidth=0.8)
        ax.annotate(
            token_text(vocabulary, audit.token_ids[position]),
            (value, 0.97),
            xytext=(-3, 0),
            textcoords="offset points",
            rotation=90,
            fontsize=7,
            color=FLAGGED_COLOR,
            xycoords=("data", "axes fraction"),
            ha="right",
            va="top",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("base-row norm")
    ax.set_ylabel("rows")
    ax.legend(fontsize=7, loc="upper left")


def _residual_panel(ax: Any, audit: RowAudit) -> None:
    if audit.residual is None:
        ax.text(0.5, 0.5, "no coefficients:\nno donor residual", ha="center", va="center")
        ax.set_axis_off()
        return
    residual = audit.residual.numpy()
    ax.hist(residual, bins=60, alpha=0.7, label="approximated rows")
    for n, position in enumerate(_labelled_positions(audit)):
        label = "flagged" if n == 0 else None
        ax.axvline(float(audit.residual[position]), color=FLAGGED_COLOR, linewidth=0.8, label=label)
    ax.legend(fontsize=7)
    ax.set_xlabel("donor residual ||t - c A|| / ||t||")
    ax.set_ylabel("rows")


def _asymmetry_panel(ax: Any, audit: RowAudit, vocabulary: Vocabulary) -> None:
    flagged = audit.flagged.numpy()
    donor_z, base_z = audit.donor_z.numpy(), audit.base_z.numpy()
    ax.scatter(donor_z[~flagged], base_z[~flagged], s=4, alpha=0.5, label="approximated")
    ax.scatter(donor_z[flagged], base_z[flagged], s=12, color=FLAGGED_COLOR, label="flagged")
    for position in _labelled_positions(audit):
        ax.annotate(
            token_text(vocabulary, audit.token_ids[position]),
            (donor_z[position], base_z[position]),
            fontsize=7,
            color=FLAGGED_COLOR,
        )
    z_max = audit.settings.z_max
    ax.axhline(z_max, color="black", linestyle="--", linewidth=0.8)
    ax.axvline(z_max, color="gray", linestyle=":", linewidth=0.8)
    ax.set_yscale("symlog")
    ax.set_ylim(min(float(base_z.min()), -z_max) * 1.5, max(float(base_z.max()), z_max) * 3)
    ax.set_xlabel("donor-row norm z")
    ax.set_ylabel("base-row norm z")
    ax.legend(fontsize=7)


def plot_audits(
    audits: Mapping[str, RowAudit], vocabulary: Vocabulary | None, path: str | os.PathLike
) -> None:
    """One row of three panels per audited matrix, saved as a PNG at ``path``."""
    plt = require_matplotlib()
    if not audits or vocabulary is None:
        raise TransplantError("nothing to plot: no donor token was approximated")
    figure, axes = plt.subplots(len(audits), 3, figsize=(16, 4.2 * len(audits)), squeeze=False)
    for row, (matrix, audit) in zip(axes, audits.items(), strict=True):
        _norm_panel(row[0], audit, vocabulary)
        _residual_panel(row[1], audit)
        _asymmetry_panel(row[2], audit, vocabulary)
        row[0].set_title(
            f"{matrix}: {int(audit.flagged.sum())} of {len(audit.token_ids)} rows flagged"
        )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
