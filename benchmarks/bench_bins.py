"""A DP release grouped by a binned column: by bin position (the copy's) against by label.

    PYTHONPATH=src:benchmarks python benchmarks/bench_bins.py [--claims 500000] [--enterprises 100000]
        [--repeats 30] [--rounds 2]

Since layout 7 a serving copy holds each binned column's bin position (`dp.prepared_bins`),
computed once when the copy is built, and a release grouped by that column groups by the
position and names the bins after. Before, every release bucketed each row itself with
polars' `cut` and the bins' string labels. This prepares bench_load's demo work directory,
builds both copies as the server does (a state directory of its own), and releases the same
DP questions through the real engine (`DPQuery.release`) over the same copy in both forms:
by position, and by label, the plan compiled as it was before the copy held positions
(`prepared_bins` seen as empty, so the plan buckets the copy's raw column). Same rows, same
analysis, noise aside. It prints the process CPU per release and the ratio position / label,
measured in the same round; rounds alternate the order, since these machines drift.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from functools import partial

from bench_copy_layout import benchmark_grant, cpu_per_call, release_arguments
from dataops.catalog import load_catalog
from dataops.config import load_config
from dataops.engines import dp
from dataops.engines._base import Plan
from dataops.engines.dp import DPQuery, enable_opendp
from dataops.engines.prepared import PreparedStore
from dataops.ir import Aggregate, Between, Function, Mode, Privacy, Query

COUNT = Aggregate(Function.COUNT)
SHAPES = {  # (dataset, aggregates, group_by, filters): grouped by the demo catalog's binned columns
    "credit: count by year_founded": ("enterprise_credit", (COUNT,), ("year_founded",), ()),
    "credit: count, sum(tax_paid) by year_founded": (
        "enterprise_credit",
        (COUNT, Aggregate(Function.SUM, "tax_paid")),
        ("year_founded",),
        (),
    ),
    "credit: mean(penalties) by size_band, year_founded >= 1990": (
        "enterprise_credit",
        (Aggregate(Function.MEAN, "penalties"),),
        ("size_band", "year_founded"),
        (Between("year_founded", 1990, None),),
    ),
    "claims: count by amount's bins": ("medical_claims", (COUNT,), ("amount",), ()),
}
FORMS = ("by position", "by label")


@contextlib.contextmanager
def labelled() -> Iterator[None]:
    """Compile as before layout 7: no binned column is read as a position."""
    kept = dp.prepared_bins
    dp.prepared_bins = lambda dataset: {}  # type: ignore[assignment]
    try:
        yield
    finally:
        dp.prepared_bins = kept  # type: ignore[assignment]


def main() -> None:
    args, workdir = release_arguments(__doc__)
    config = load_config(workdir / "dataops.toml")
    catalog = load_catalog(config.paths.catalog, config.paths.sandbox)
    enable_opendp()
    store = PreparedStore(workdir / "bins" / "state")  # the copies as the server builds them
    print(f"{args.enterprises} enterprises, {args.claims} claim rows; CPU per release, {args.repeats} each")
    results: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        order = FORMS if round_ % 2 == 0 else tuple(reversed(FORMS))
        for shape, (dataset_id, aggregates, group_by, filters) in SHAPES.items():
            dataset = catalog.get(dataset_id)
            source = store.source(dataset)
            grant = benchmark_grant(dataset.id)
            privacy = Privacy(epsilon=0.03)
            plan = Plan(Query(dataset.id, aggregates, filters, group_by, Mode.DP, privacy), dataset, grant)
            for form in order:
                with labelled() if form == "by label" else contextlib.nullcontext():
                    query = DPQuery.compile(plan, source=source)
                coded = [d.coded for d in query._compiled.dims if d.bins is not None]
                assert coded == [form == "by position"], (shape, form, coded)
                calibration = query.calibrate(privacy)
                seconds = cpu_per_call(partial(query.release, calibration), args.repeats)
                results.setdefault((shape, form), []).append(seconds)
        print(f"round {round_ + 1} done", flush=True)
    print(f"\n{'question':62}{'by position':>14}{'by label':>14}{'position / label':>18}")
    for shape in SHAPES:
        position, label = (statistics.median(results[(shape, form)]) * 1e3 for form in FORMS)
        print(f"{shape:62}{position:11.2f} ms{label:11.2f} ms{position / label:17.2f}x")


if __name__ == "__main__":
    main()
