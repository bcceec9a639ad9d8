"""Known attacks on statistical releases, run against the real server.

Each attack is a test: its docstring states the attack, and the test asserts that it
fails. A test that passes whatever the server does proves nothing, so every control
is also switched off on the running in-process server (`monkeypatch`, parameter
`control="off"`), and the same test then asserts that the attack SUCCEEDS: it
recovers the hidden value from the raw data. The pair shows each control is what
stops its attack.

The demo data (conftest: 20 000 enterprises) holds what the attacks aim at: two farms
in Gaoxin (min_units = 10 of city-bank's table hides that cell), one enterprise founded
in 1953, and Binhai x Finance, a cell of 24 firms where two pay ~98% of the tax.

Exact (aggregate-mode) answers are lookups in a published table protected jointly with
all its sub-totals, so the attacks that combined per-query answers (margins minus
cells, trackers, reconstruction) now recover nothing; the same attacks with the
table's protection switched off recover the cells.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from conftest import write_config
from dataops.client import Client, DataopsClientError, count, count_units, total
from dataops.ir import Between, Equals, InSet
from dataops.ledger import MAX_DELTA, MAX_EPSILON
from dataops.server import build_server
from dataops.values import PrivacyLoss

CREDIT = "enterprise_credit"
K = 10  # city-bank's min_group_size
GAOXIN_FARMS = [Equals("district", "Gaoxin"), Equals("industry", "Agriculture")]
INDUSTRIES = (
    "Manufacturing",
    "Wholesale & Retail",
    "Construction",
    "IT & Software",
    "Catering",
    "Logistics",
    "Real Estate",
    "Finance",
    "Agriculture",
    "Healthcare",
)
DISTRICTS = (
    "Dongcheng",
    "Xicheng",
    "Nanhu",
    "Beishan",
    "Jiangbin",
    "Gaoxin",
    "Binhai",
    "Qingshan",
    "Hexi",
    "Lingang",
)
ON_OFF = pytest.mark.parametrize("control", ["on", "off"])


@pytest.fixture(scope="module")
def raw(sandbox_dir: Path) -> pl.DataFrame:
    """The attacker's target, read directly: what a successful attack recovers."""
    return pl.read_parquet(sandbox_dir / "finance/enterprise_credit.parquet")


@pytest.fixture
def city(connect) -> Client:
    return connect("city-bank")


def refused(attempt) -> DataopsClientError:
    with pytest.raises(DataopsClientError) as err:
        attempt()
    return err.value


def switch_off(monkeypatch, control: str, target, name: str, replacement) -> None:
    if control == "off":
        monkeypatch.setattr(target, name, replacement)


def tax_of(raw: pl.DataFrame, where: pl.Expr) -> float:
    return raw.filter(where)["tax_paid"].sum()


# --- exact answers (aggregate mode): lookups in the protected table ---------------------------
#
# Switching a control off means protecting the table without it, on a server of its
# own: `release_everything` publishes every cell's true values (no primary suppression),
# `secondary=False` keeps primary suppression but no secondary (what the old per-query
# controls amounted to).

DIMS = ("district", "industry", "size_band")


def _release_everything(protect):
    def unprotected(product, dataset, *args, **kwargs):
        import numpy as np

        from dataops.tables import RELEASED, _released_cells

        table = protect(product, dataset, *args, **kwargs)
        cube = table.confidential.cube
        cells = _released_cells(
            product, dataset, cube, np.zeros(cube.n_cells, bool), np.full(cube.n_cells, RELEASED)
        )
        return dataclasses.replace(table, cells=cells)

    return unprotected


@pytest.fixture
def exact(config, pki, server, connect, monkeypatch, sandbox_dir):
    """`exact(control)` -> a city-bank client of a server whose table is protected with the
    control on ("on": the shared server), with no protection ("nothing") or without
    secondary suppression ("no-secondary")."""
    from dataops.engines import table as table_engine

    started = []
    shared = server

    def make(control: str) -> Client:
        if control == "on":
            return connect("city-bank")
        import collections

        import dataops.tables.store

        # The shared server's own (protected) builds must be done before the process's
        # store is swapped below, or a build still running lands in the swapped store
        # and this server would serve the protected table it was meant to do without.
        assert shared.sandbox.tables.wait_ready(300)
        work = config.paths.catalog.parent.parent / f"off-{len(started)}"
        work.mkdir()
        off = write_config(work, sandbox_dir, pki, tables=False)  # protect afresh, without the control
        (off.paths.products / "claims_by_demography_diagnosis.toml").unlink()  # not needed here
        (off.paths.policies / "harbor-insurance.toml").unlink()
        # Not the process's shared builds (protected with the control on): this server protects its own.
        monkeypatch.setattr(dataops.tables.store, "_SHARED", collections.OrderedDict())
        real = dataops.tables.protect
        # The engine serves only tables whose LP audit passed: serving these is the control off too.
        monkeypatch.setattr(table_engine, "audit_passed", lambda protected: True)
        if control == "nothing":
            monkeypatch.setattr(dataops.tables, "protect", _release_everything(real))
        else:
            monkeypatch.setattr(
                dataops.tables, "protect", lambda *a, **k: real(*a, **{**k, "secondary": False})
            )
        server = build_server(off).start()
        client = Client.from_directory(f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank")
        started.append((server, client))
        return client

    yield make
    for server, client in started:
        client.close()
        server.stop(grace=1.0)


def _grid_cells(client: Client, aggregates) -> dict[tuple, tuple]:
    """Everything the consumer can read: every sub-total table of the cube, cell key -> values."""
    known = {}
    for r in range(len(DIMS) + 1):
        for group_by in itertools.combinations(DIMS, r):
            frame = client.query(CREDIT, aggregates=aggregates, group_by=list(group_by)).frame
            for row in frame.iter_rows(named=True):
                key = tuple(row[d] if d in group_by else None for d in DIMS)
                known[key] = tuple(row[a.name] for a in aggregates)
    return known


KEYS = {"district": DISTRICTS, "industry": INDUSTRIES, "size_band": ("micro", "small", "medium", "large")}


def _truth(raw: pl.DataFrame) -> dict[tuple, tuple[int, float]]:
    """Every cell of the cube, margins included, from the raw data."""
    out = {}
    for r in range(len(DIMS) + 1):
        for group_by in itertools.combinations(DIMS, r):
            for key in itertools.product(*((KEYS[d] if d in group_by else (None,)) for d in DIMS)):
                where = pl.lit(True)
                for d, v in zip(DIMS, key):
                    if v is not None:
                        where &= pl.col(d) == v
                out[key] = where
    frame = raw.select(
        [
            pl.struct(pl.col("tax_paid").filter(w).sum().alias("t"), w.sum().alias("n")).alias(str(i))
            for i, w in enumerate(out.values())
        ]
    ).row(0)
    return {key: (v["n"], v["t"]) for key, v in zip(out, frame)}


def _differencing(known: dict[tuple, tuple]) -> dict[tuple, tuple]:
    """Margin minus the other cells, repeated until nothing new follows: what it derives."""
    known = dict(known)
    derived = {}
    changed = True
    while changed:
        changed = False
        for j, d in enumerate(DIMS):
            for parent in [
                k for k in itertools.product(*((KEYS[x] + (None,)) for x in DIMS)) if k[j] is None
            ]:
                children = [parent[:j] + (v,) + parent[j + 1 :] for v in KEYS[d]]
                family = [parent, *children]
                unknown = [k for k in family if k not in known]
                if len(unknown) != 1:
                    continue
                (target,) = unknown
                width = len(next(iter(known.values())))
                values = []
                for i in range(width):
                    total = sum(known[k][i] for k in children if k in known)
                    values.append(total + known[parent][i] if target == parent else known[parent][i] - total)
                known[target] = derived[target] = tuple(values)
                changed = True
    return derived


@pytest.mark.parametrize("control", ["on", "no-secondary"])
def test_margin_differencing_over_every_sub_total_recovers_no_suppressed_cell(exact, raw, control):
    """Attack (complementary cells): read every sub-total table of district x industry x
    size band, then repeatedly take a margin minus its released cells. Control: secondary
    suppression — enough further cells are suppressed that no family has one unknown."""
    client = exact(control)
    aggregates = [count("n"), total("tax_paid", "tax")]
    known = _grid_cells(client, aggregates)
    derived = _differencing(known)
    truth = _truth(raw)
    exact_hits = {
        k
        for k, (n, tax) in derived.items()
        if n == truth[k][0] and tax == pytest.approx(truth[k][1], abs=0.01)
    }
    if control == "on":
        assert derived == {}
    else:  # the suppressed cells come back exactly, small ones included
        assert exact_hits and any(0 < truth[k][0] < K for k in exact_hits)


@pytest.mark.parametrize("control", ["on", "no-secondary"])
def test_linear_reconstruction_pins_no_suppressed_cell(exact, raw, control):
    """Attack (linear reconstruction): every released count of every sub-total table is a
    linear equation over the base cells; with non-negativity, an LP (HiGHS) gives each
    suppressed cell's lowest and highest possible count. A cell whose bounds meet is
    disclosed. Control: secondary suppression (checked by the table's own LP audit)."""
    from scipy.optimize import linprog

    client = exact(control)
    known = _grid_cells(client, [count("n")])
    base = list(itertools.product(*(KEYS[d] for d in DIMS)))
    index = {k: i for i, k in enumerate(base)}
    rows, rhs = [], []
    for key, (n,) in known.items():
        row = [0.0] * len(base)
        for cell in base:
            if all(v is None or v == c for v, c in zip(key, cell)):
                row[index[cell]] = 1.0
        rows.append(row)
        rhs.append(n)
    hidden = [k for k in base if k not in known]
    truth = _truth(raw)
    pinned = []
    for cell in hidden[:60]:
        c = [0.0] * len(base)
        c[index[cell]] = 1.0
        low = linprog(c, A_eq=rows, b_eq=rhs, bounds=(0, None), method="highs").fun
        high = -linprog([-x for x in c], A_eq=rows, b_eq=rhs, bounds=(0, None), method="highs").fun
        if high - low < 0.5:
            pinned.append((cell, round(low)))
    if control == "on":
        assert hidden and pinned == []
    else:
        assert pinned and all(truth[cell][0] == value for cell, value in pinned)


@pytest.mark.parametrize("control", ["on", "nothing"])
def test_singling_out_through_a_small_cell_is_suppressed(exact, raw, control):
    """Attack: read a cell that holds two units (Gaoxin's two farms) off the table.
    Control: primary suppression (fewer than min_units = 10 units per cell)."""
    client = exact(control)
    result = client.query(
        CREDIT, aggregates=[count_units("n"), total("tax_paid", "tax")], filters=GAOXIN_FARMS
    )
    farms = raw.filter((pl.col("district") == "Gaoxin") & (pl.col("industry") == "Agriculture"))
    assert farms.height == 2
    if control == "on":
        assert result.frame.height == 0 and result.rows_suppressed == 1
    else:
        assert result.frame["n"][0] == 2 and result.frame["tax"][0] == pytest.approx(farms["tax_paid"].sum())


@pytest.mark.parametrize("control", ["on", "nothing"])
def test_a_dominated_sum_is_suppressed(exact, raw, control):
    """Attack: SUM(tax_paid) of Binhai x Finance, where two firms pay ~98%: the total is
    what those two paid. Control: (n, k) dominance, and secondary suppression so the
    margin minus the other cells does not give it back."""
    client = exact(control)
    truth = raw.filter((pl.col("district") == "Binhai") & (pl.col("industry") == "Finance"))
    top_two = truth["tax_paid"].sort(descending=True).head(2).sum()
    assert top_two / truth["tax_paid"].sum() > 0.95
    cell = client.query(
        CREDIT,
        aggregates=[total("tax_paid", "tax")],
        filters=[Equals("district", "Binhai"), Equals("industry", "Finance")],
    ).frame
    margin = client.query(
        CREDIT, aggregates=[total("tax_paid", "tax")], filters=[Equals("district", "Binhai")]
    )
    others = client.query(
        CREDIT,
        aggregates=[total("tax_paid", "tax")],
        filters=[
            Equals("district", "Binhai"),
            InSet("industry", tuple(i for i in INDUSTRIES if i != "Finance")),
        ],
    )
    if control == "on":
        assert cell.height == 0
        assert margin.frame.height == 0 or others.frame.height == 0  # no difference to take
    else:
        assert cell["tax"][0] == pytest.approx(top_two, rel=0.05)


@pytest.mark.parametrize("control", ["on", "nothing"])
def test_differencing_and_padding_trackers_get_nothing(exact, raw, control):
    """Attacks: N vs N-1 (Gaoxin minus Gaoxin without Agriculture), padding (farms in
    {Gaoxin, Dongcheng} minus farms in Dongcheng), a range (founded since 1953 minus since
    1954), and the general tracker |G & A| = |G| + |A| - |all| + |not G & not A|.
    Control: answers are sums of released cells only (a row needing a suppressed cell is
    not returned), and ranges or columns outside the table are not answered at all."""
    client = exact(control)
    n = [count_units("n")]
    farms = 2
    others = lambda values, drop: tuple(v for v in values if v != drop)  # noqa: E731

    def ask(**kwargs):
        frame = client.query(CREDIT, aggregates=n, **kwargs).frame
        return frame["n"][0] if frame.height else None

    gaoxin = ask(filters=[Equals("district", "Gaoxin")])
    rest = ask(filters=[Equals("district", "Gaoxin"), InSet("industry", others(INDUSTRIES, "Agriculture"))])
    padded = ask(filters=[Equals("industry", "Agriculture"), InSet("district", ("Gaoxin", "Dongcheng"))])
    padding = ask(filters=[Equals("industry", "Agriculture"), Equals("district", "Dongcheng")])
    g, a, everyone = gaoxin, ask(filters=[Equals("industry", "Agriculture")]), ask()
    neither = ask(
        filters=[
            InSet("district", others(DISTRICTS, "Gaoxin")),
            InSet("industry", others(INDUSTRIES, "Agriculture")),
        ]
    )
    err = refused(lambda: client.query(CREDIT, aggregates=n, filters=[Between("year_founded", 1953, 2026)]))
    assert err.rule == "table.coverage" and err.column == "year_founded"
    recovered = []
    if gaoxin is not None and rest is not None:
        recovered.append(gaoxin - rest)
    if padded is not None and padding is not None:
        recovered.append(padded - padding)
    if None not in (g, a, everyone, neither):
        recovered.append(g + a - everyone + neither)
    if control == "on":
        assert recovered == []
    else:
        assert recovered == [farms, farms, farms]


def test_suppression_reports_how_many_rows_not_which(city):
    """Attack: read which cells are small from the suppression itself. The response holds
    released cells only, with no marker for the others; `rows_suppressed` is the size of
    the requested (public) key grid minus the rows returned. In DP mode every key comes back."""
    result = city.query(CREDIT, aggregates=[count_units("n")], group_by=["district", "industry"])
    assert result.frame.height + result.rows_suppressed == len(DISTRICTS) * len(INDUSTRIES)
    assert result.rows_suppressed > 0
    assert result.frame.null_count().sum_horizontal()[0] == 0
    assert result.frame["n"].min() >= K
    noisy = city.query(
        CREDIT, aggregates=[count_units("n")], group_by=["district", "industry"], mode="dp", epsilon=0.5
    )
    assert noisy.frame.height == len(DISTRICTS) * len(INDUSTRIES) and noisy.rows_suppressed == 0


# --- DP mode ---------------------------------------------------------------------------------


def test_in_dp_mode_one_unit_is_within_the_noise_of_a_small_or_dominated_cell(city, raw):
    """Attack (DP mode): the same small and dominated cells. Every key is released, but
    the 95% interval of each count is wider than one unit, and of each sum wider than
    the largest firm's tax: the answer cannot tell whether that unit is in the data."""
    result = city.query(
        CREDIT,
        aggregates=[count_units("n"), total("tax_paid", "tax")],
        group_by=["district", "industry"],
        mode="dp",
        epsilon=1.0,
    )
    assert result.frame.height == len(DISTRICTS) * len(INDUSTRIES)  # no suppression pattern to read
    assert result.accuracy["n"].half_width_95 > 1
    assert result.accuracy["tax"].half_width_95 > raw["tax_paid"].max()


def test_in_dp_mode_differencing_leaves_the_target_inside_the_noise(city, raw):
    """Attack (DP mode): the same difference of two totals is answered — DP has no tracker
    defence — but the difference of two noisy totals carries the noise of both: its 95%
    interval is far wider than the farms' tax it tries to reveal. The padded tracker is
    the same subtraction, with the same noise."""
    tax = [total("tax_paid", "tax")]
    narrowed = [
        Equals("district", "Gaoxin"),
        InSet("industry", tuple(i for i in INDUSTRIES if i != "Agriculture")),
    ]
    a = city.query(CREDIT, aggregates=tax, filters=[Equals("district", "Gaoxin")], mode="dp", epsilon=1.0)
    b = city.query(CREDIT, aggregates=tax, filters=narrowed, mode="dp", epsilon=1.0)
    farms = tax_of(raw, (pl.col("district") == "Gaoxin") & (pl.col("industry") == "Agriculture"))
    spread = (a.accuracy["tax"].half_width_95 ** 2 + b.accuracy["tax"].half_width_95 ** 2) ** 0.5
    assert spread > 100 * farms


def _dp_server(config, pki, *, grant_epsilon: float, dataset_epsilon: float = 30.0):
    """A server whose city-bank grant and dataset cap are set for the attack."""
    root = config.paths.catalog.parent
    for path, value in (
        (root / "catalog" / f"{CREDIT}.toml", dataset_epsilon),
        (root / "policies" / "city-bank.toml", grant_epsilon),
    ):
        text = re.sub(
            r"(?m)^(\[(?:grants\.)?budget\][^\[]*?)^epsilon = .*$", rf"\1epsilon = {value}", path.read_text()
        )
        path.write_text(text)
    server = build_server(config).start()
    client = Client.from_directory(f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank")
    assert server.policies.current.get("city-bank").grants[CREDIT].budget.epsilon == grant_epsilon
    return server, client


@pytest.fixture
def dp_server(config, pki):
    started = []

    def start(**kwargs):
        server, client = _dp_server(config, pki, **kwargs)
        started.append((server, client))
        return server, client

    yield start
    for server, client in started:
        client.close()
        server.stop(grace=1.0)


def _unchecked_reserve(monkeypatch, server) -> None:
    """The ledger debits whatever is asked, checking no budget."""
    reserve = server.ledger.reserve

    def unchecked(*args, **kwargs):
        kwargs["grant_total"] = kwargs["dataset_total"] = PrivacyLoss(MAX_EPSILON, MAX_DELTA)
        return reserve(*args, **kwargs)

    monkeypatch.setattr(server.ledger, "reserve", unchecked)


@ON_OFF
def test_reconstruction_in_dp_mode_runs_out_of_budget(dp_server, raw, monkeypatch, control):
    """Attack (reconstruction, DP mode): ask the district x industry counts 40 times,
    each a different question (a vacuous year filter defeats release reuse), and average
    the answers: the noise averages out and the small cells appear exactly. Control:
    the budget (epsilon 5 for the grant) — after two answers at epsilon 2 the ledger
    refuses."""
    server, client = dp_server(grant_epsilon=5.0)
    if control == "off":
        _unchecked_reserve(monkeypatch, server)

    def ask(i: int):
        try:
            return client.query(
                CREDIT,
                aggregates=[count_units("n")],
                group_by=["district", "industry"],
                filters=[Between("year_founded", 1900 - i, None)],
                mode="dp",
                epsilon=2.0,
            )
        except DataopsClientError as exc:
            return exc

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(ask, range(40)))
    answers = [o for o in outcomes if not isinstance(o, DataopsClientError)]
    truth = raw.group_by("district", "industry").agg(pl.len().cast(pl.Int64).alias("truth"))
    estimate = (
        pl.concat([a.frame for a in answers])
        .group_by("district", "industry")
        .agg(pl.col("n").mean().round().alias("guess"))
        .join(truth, on=["district", "industry"])
    )
    # The 95% half-width of the attacker's average: under 0.5, rounding it gives the count.
    half_width = answers[0].accuracy["n"].half_width_95 / len(answers) ** 0.5
    if control == "on":
        assert len(answers) == 2
        assert {o.reason for o in outcomes if isinstance(o, DataopsClientError)} == {"BUDGET_EXHAUSTED"}
        assert server.ledger.spent("city-bank", CREDIT).epsilon <= 5.0
        assert half_width > 0.5
        assert estimate.filter(pl.col("guess") != pl.col("truth")).height > 0
    else:  # every question answered: the averaged table is the true one, small cells included
        assert len(answers) == 40 and half_width < 0.5
        small = estimate.filter(pl.col("truth") < K)
        assert small.height == 3 and (small["guess"] == small["truth"]).all()


@ON_OFF
def test_averaging_repeated_noisy_answers_gains_nothing(dp_server, raw, monkeypatch, control):
    """Attack (averaging): ask the same noisy count of Gaoxin's farms 120 times and
    average; the noise cancels and the count (2) appears. The budget is made large
    enough not to stop it. Control: release reuse — an identical question gets the
    identical stored answer and spends nothing, so the average is one answer.
    (Aggregate mode answers exactly: there is no noise to average away.)"""
    server, client = dp_server(grant_epsilon=200.0, dataset_epsilon=200.0)
    if control == "off":
        monkeypatch.setattr(server.sandbox.releases, "key", lambda *args, **kwargs: secrets.token_hex(32))

    def ask(_):
        return client.query(CREDIT, aggregates=[count("n")], filters=GAOXIN_FARMS, mode="dp", epsilon=1.0)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(120)))
    answers = [r.frame["n"][0] for r in results]
    spent = server.ledger.spent("city-bank", CREDIT).epsilon
    if control == "on":
        assert len(set(answers)) == 1  # the average is one answer
        assert spent == pytest.approx(1.0)
        assert sum(r.reused for r in results) >= 119
    else:  # fresh noise each time: the average recovers the hidden count
        assert len(set(answers)) > 1 and spent == pytest.approx(120.0)
        assert round(sum(answers) / len(answers)) == 2


@ON_OFF
def test_racing_concurrent_requests_cannot_overspend_the_budget(dp_server, monkeypatch, control):
    """Attack (budget race): fire many distinct DP requests at once, hoping several pass
    the budget check before any is debited. Control: the ledger checks and debits in one
    SQLite transaction; switched off, it checks what was spent, then debits (a
    check-then-act race), and concurrent requests overspend."""
    server, client = dp_server(grant_epsilon=1.0)
    if control == "off":
        reserve = server.ledger.reserve
        gate = threading.Barrier(4, timeout=5)

        def racy(consumer, dataset, epsilon, *args, **kwargs):
            if server.ledger.spent(consumer, dataset).epsilon + epsilon > kwargs["grant_total"].epsilon:
                return reserve(consumer, dataset, epsilon, *args, **kwargs)  # raises BudgetExhausted
            try:
                gate.wait()  # the race window: every racer has checked, none has debited
            except threading.BrokenBarrierError:
                pass
            kwargs["grant_total"] = kwargs["dataset_total"] = PrivacyLoss(MAX_EPSILON, MAX_DELTA)
            return reserve(consumer, dataset, epsilon, *args, **kwargs)

        monkeypatch.setattr(server.ledger, "reserve", racy)

    def attempt(i: int):
        try:
            return client.query(
                CREDIT,
                aggregates=[count()],
                group_by=["size_band"],
                filters=[Between("year_founded", 1960 + i, None)],
                mode="dp",
                epsilon=0.5,
            )
        except DataopsClientError as exc:
            return exc

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(attempt, range(16)))
    answered = [o for o in outcomes if not isinstance(o, DataopsClientError)]
    spent = server.ledger.spent("city-bank", CREDIT).epsilon
    if control == "on":
        assert len(answered) == 2 and spent == pytest.approx(1.0)
        assert {o.reason for o in outcomes if isinstance(o, DataopsClientError)} == {"BUDGET_EXHAUSTED"}
    else:
        assert len(answered) > 2 and spent > 1.0
