"""The statistics the pipelines report: correlations, permutation and bootstrap intervals,
random-direction nulls, means with standard errors. Plain functions on tensors; nothing here knows
about models or traits."""

import torch


def mean_se(values) -> tuple[float | None, float | None, int]:
    """Mean, standard error and count of the values that are not None.

    >>> m, se, n = mean_se([1.0, 2.0, 3.0, None]); (m, round(se, 4), n)
    (2.0, 0.5774, 3)
    """
    xs = [float(x) for x in values if x is not None]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    se = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5 if len(xs) > 1 else 0.0
    return m, se, len(xs)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (nan when either is constant).

    >>> round(pearson(torch.tensor([1., 2., 3.]), torch.tensor([2., 4., 7.])), 4)
    0.9934
    """
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = (x.norm() * y.norm()).item()
    return float((x @ y).item() / den) if den > 0 else float("nan")


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties sharing their average rank.

    >>> ranks(torch.tensor([10., 30., 20., 30.])).tolist()
    [1.0, 3.5, 2.0, 3.5]
    """
    x = x.double()
    r = torch.empty_like(x)
    order = x.argsort()
    r[order] = torch.arange(1, len(x) + 1, dtype=torch.double)
    for v in x.unique():
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(ranks(x), ranks(y))


def permutation_p(stat, x: torch.Tensor, y: torch.Tensor, n: int = 1000, seed: int = 0) -> float:
    """Two-sided permutation p-value of stat(x, y): how often shuffling y gives |stat| at least as
    large."""
    g = torch.Generator().manual_seed(seed)
    observed = abs(stat(x, y))
    hits = sum(
        abs(stat(x, y[torch.randperm(len(y), generator=g)])) >= observed - 1e-12 for _ in range(n)
    )
    return (1 + hits) / (1 + n)


def within_r(x: torch.Tensor, y: torch.Tensor, groups: list) -> float:
    """Mean over conditions of the correlation inside each condition (conditions with a constant
    side skipped)."""
    rs = [
        pearson(x[idx], y[idx])
        for g in dict.fromkeys(groups)
        if len(idx := torch.tensor([i for i, h in enumerate(groups) if h == g])) > 2
    ]
    rs = [r for r in rs if r == r]
    return sum(rs) / len(rs) if rs else float("nan")


def bootstrap_ci(stat, n: int, boots: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of stat(indices) over `boots` resamples of range(n) with
    replacement."""
    g = torch.Generator().manual_seed(seed)
    vals = sorted(
        v for _ in range(boots) if (v := stat(torch.randint(0, n, (n,), generator=g))) == v
    )
    if not vals:
        return float("nan"), float("nan")
    return vals[int(0.025 * (len(vals) - 1))], vals[int(0.975 * (len(vals) - 1))]


def random_directions(n: int, norm: float, hidden: int, seed: int = 0) -> torch.Tensor:
    """n random directions [n, hidden], each of the given norm (the null baseline for
    projections)."""
    d = torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))
    return d / d.norm(dim=-1, keepdim=True) * norm


def random_band(
    h: torch.Tensor, proj: torch.Tensor, grade: torch.Tensor, n_conditions: int, dirs: torch.Tensor
) -> dict:
    """Per condition (grade 0..n_conditions - 1), the 5th-95th percentile of the mean projection of
    states h [rows, hidden] along random unit directions `dirs`, each centred on its own mean over
    all rows and moved to that of the vector's projections `proj`: the band a direction of no
    meaning spans."""
    rand = h.double() @ dirs.double().T  # [rows, n_random]
    rand = rand - rand.mean(0) + proj.double().mean()
    # [conditions, n_random]
    means = torch.stack([rand[grade == g].mean(0) for g in range(n_conditions)])
    return {
        f"band_{q}": [round(x, 4) for x in means.quantile(q / 100, dim=1).tolist()] for q in (5, 95)
    }
