"""Data known by its content, over the real server: sandbox locations, one cap per
content, DP off until the operator bounds contributions, and release reuse per consumer.

Each control is also switched off (`control="off"`) to show the attack it stops then
works, as in tests/test_attacks.py.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import grpc
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import audit_records, write_config
from dataops import catalog as catalog_module
from dataops.catalog import load_catalog
from dataops.client import Client, DataopsClientError, count, total
from dataops.errors import CatalogError
from dataops.server import build_server
from dataops.values import PrivacyLoss
from dataops.versions import DataVersions

CREDIT = "enterprise_credit"
ON_OFF = pytest.mark.parametrize("control", ["on", "off"])


@pytest.fixture
def private(tmp_path: Path, sandbox_dir: Path, pki):
    """A configuration over a private copy of the sandbox, which tests may change."""
    sandbox = tmp_path / "sandbox"
    shutil.copytree(sandbox_dir, sandbox)
    work = tmp_path / "work"
    work.mkdir()
    return write_config(work, sandbox, pki)


@pytest.fixture
def started(pki):
    running = []

    def start(config, consumer: str = "city-bank"):
        server = build_server(config).start()
        clients = {}

        def client(name: str = consumer) -> Client:
            if name not in clients:
                clients[name] = Client.from_directory(
                    f"localhost:{server.port}", pki.consumer_dir(name), name
                )
            return clients[name]

        running.append((server, clients))
        return server, client

    yield start
    for server, clients in running:
        for c in clients.values():
            c.close()
        server.stop(grace=1.0)


def refused(attempt) -> DataopsClientError:
    with pytest.raises(DataopsClientError) as err:
        attempt()
    return err.value


def when_ready(attempt, reason: str, seconds: float = 60.0):
    """attempt(), asked again while it is refused UNAVAILABLE with `reason` (a table or copy
    being made for a new data version), for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return attempt()
        except DataopsClientError as err:
            assert err.code is grpc.StatusCode.UNAVAILABLE and err.reason == reason, err
            assert time.monotonic() < deadline, f"still {reason} after {seconds} s"
            time.sleep(0.2)


def set_epsilon(path: Path, value: float, table: str = r"(?:grants\.)?budget") -> None:
    text = re.sub(rf"(?m)^(\[{table}\][^\[]*?)^epsilon = .*$", rf"\g<1>epsilon = {value}", path.read_text())
    path.write_text(text)


def counts(client: Client, dataset: str = CREDIT, epsilon: float = 0.5, variant: int = 0):
    """A DP count by size band; another `variant` (the output's name) is another question."""
    name = f"n{variant}" if variant else "n"
    return client.query(dataset, aggregates=[count(name)], group_by=["size_band"], mode="dp", epsilon=epsilon)


# --- locations resolve inside the sandbox ----------------------------------------------------


def outside_copy(config, tmp_path: Path) -> Path:
    """An attacker's file outside the sandbox: the credit registry with 100 rows."""
    outside = tmp_path / "outside" / "planted.parquet"
    outside.parent.mkdir()
    pl.read_parquet(config.paths.sandbox / "finance" / f"{CREDIT}.parquet").head(100).write_parquet(outside)
    return outside


@ON_OFF
def test_a_symlink_out_of_the_sandbox_is_refused_at_catalog_load(private, tmp_path, monkeypatch, control):
    """Attack: replace a dataset file in sandbox/ by a symlink to a file elsewhere (or link
    a whole directory out); the server would serve data nobody catalogued. Control: the
    location must resolve inside sandbox/."""
    if control == "off":
        monkeypatch.setattr(catalog_module, "resolves_inside", lambda path, root: True)
    outside = outside_copy(private, tmp_path)
    target = private.paths.sandbox / "finance" / f"{CREDIT}.parquet"
    target.unlink()
    target.symlink_to(outside)
    if control == "on":
        with pytest.raises(
            CatalogError,
            match=rf"{CREDIT}\.toml: location: 'finance/{CREDIT}\.parquet' "
            r"resolves to .*planted\.parquet, outside the sandbox",
        ):
            load_catalog(private.paths.catalog, private.paths.sandbox)
        # A directory on the way linked out is refused the same way.
        target.unlink()
        finance = private.paths.sandbox / "finance"
        shutil.move(finance, tmp_path / "finance-elsewhere")
        finance.symlink_to(tmp_path / "finance-elsewhere")
        with pytest.raises(CatalogError, match=r"location: .*outside the sandbox"):
            load_catalog(private.paths.catalog, private.paths.sandbox)
    else:  # the planted file is what the catalog serves
        dataset = load_catalog(private.paths.catalog, private.paths.sandbox).get(CREDIT)
        assert pl.read_parquet(dataset.path).height == 100


def test_a_symlink_inside_the_sandbox_is_fine(private) -> None:
    target = private.paths.sandbox / "finance" / f"{CREDIT}.parquet"
    moved = private.paths.sandbox / "finance" / "registry-2026.parquet"
    os.replace(target, moved)
    target.symlink_to(moved.name)
    assert load_catalog(private.paths.catalog, private.paths.sandbox).get(CREDIT) is not None


def test_the_kernels_resolution_is_realpaths(tmp_path: Path, monkeypatch) -> None:
    """`real_path` (O_PATH and /proc/self/fd) names what os.path.realpath names, for every
    kind of path the location check meets: links to a file and to a directory on the way,
    a relative link, a relative path, and paths it cannot open (missing, a link loop)."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "file.parquet").write_bytes(b"x")
    (root / "dir-link").symlink_to(root / "a")
    (root / "a" / "rel-link").symlink_to("b/file.parquet")
    (root / "loop").symlink_to(root / "loop")
    monkeypatch.chdir(root)
    paths = [
        root / "a" / "b" / "file.parquet",
        root / "dir-link" / "b" / "file.parquet",
        root / "a" / "rel-link",
        Path("a/b/../b/file.parquet"),
        root / "missing" / "file.parquet",
        root / "loop",
        root,
    ]
    for path in paths:
        assert catalog_module.real_path(path) == os.path.realpath(path), path
    # The check built on it: a link out of the root is outside, one within it inside.
    outside = tmp_path / "elsewhere.parquet"
    outside.write_bytes(b"y")
    (root / "out-link").symlink_to(outside)
    assert not catalog_module.resolves_inside(root / "out-link", root)
    assert catalog_module.resolves_inside(root / "dir-link" / "b" / "file.parquet", root)


@ON_OFF
def test_a_symlink_swapped_in_while_serving_is_refused(
    private, started, tmp_path, monkeypatch, control
) -> None:
    """Attack: once the catalog is loaded, swap a dataset file for a symlink out of sandbox/.
    Control: every read resolves the location again (`versions.inside_sandbox`)."""
    server, client = started(private)
    counts(client())
    target = private.paths.sandbox / "finance" / f"{CREDIT}.parquet"
    link = target.with_name(".swap")
    link.symlink_to(outside_copy(private, tmp_path))
    os.replace(link, target)
    if control == "off":  # the per-request check passes whatever the path resolves to
        monkeypatch.setattr(catalog_module, "is_inside", lambda real, root: True)
        # The planted file (100 rows, fitting the catalog entry) is taken as the dataset's
        # new version: a DP count, once its serving copy is rebuilt, counts it, not the 20,000.
        answer = when_ready(lambda: counts(client(), variant=21), "DP_COPY_NOT_READY", 120)
        assert sum(answer.table.column("n21").to_pylist()) < 1000
        return
    for attempt in (
        lambda: counts(client(), variant=21),
        lambda: client().query(CREDIT, aggregates=[count()], group_by=["size_band"]),
    ):
        err = refused(attempt)
        assert err.code is grpc.StatusCode.FAILED_PRECONDITION and err.reason == "DATASET_UNAVAILABLE"
        assert "planted" not in err.message and "outside" not in err.message  # the operator's detail
    assert audit_records(private)[-1]["code"] == "FAILED_PRECONDITION"


def exact_counts(client: Client) -> list[int]:
    """An exact count by size band: a lookup in the protected credit table."""
    return (
        client.query(CREDIT, aggregates=[count()], group_by=["size_band"]).table.column("count").to_pylist()
    )


@ON_OFF
def test_exact_answers_never_come_from_a_replaced_version(private, started, monkeypatch, control) -> None:
    """Attack (an operator's mistake, not a consumer's): the file is replaced by corrected
    data while the server runs; the previous version's table goes on answering from rows
    the operator withdrew until the new one is protected, and a DP answer of the same moment
    counts other data. Control: a table is served only for the data version it was
    protected for; until then `UNAVAILABLE`, `TABLE_NOT_READY`."""
    from dataops.engines import table as table_module

    if control == "off":  # a table of any version serves
        monkeypatch.setattr(table_module.TableEngine, "_serves", lambda self, t, v: t in self._indexes)
    server, client = started(private)
    before = exact_counts(client())
    assert sum(before) == 20_000
    target = private.paths.sandbox / "finance" / f"{CREDIT}.parquet"
    replacement = target.with_name(".new")
    pl.read_parquet(target).head(5_000).write_parquet(replacement)
    os.replace(replacement, target)
    seen, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            seen.append(exact_counts(client()))
        except DataopsClientError as err:
            assert err.code is grpc.StatusCode.UNAVAILABLE and err.reason == "TABLE_NOT_READY", err
            assert err.retry_after_seconds and err.retry_after_seconds > 0
            seen.append(None)
            continue
        if sum(seen[-1]) < 20_000:
            break
    answered = [c for c in seen if c is not None]
    assert answered and sum(answered[-1]) <= 5_000  # the new version's table, in the end
    if control == "on":
        assert before not in answered  # not once the old counts, after the replacement
    else:
        assert answered[0] == before  # the withdrawn rows answered until the poll came round


def test_a_table_that_cannot_be_protected_for_a_new_version_is_not_replaced_by_the_old(
    private, started, monkeypatch
) -> None:
    """The new version's protection fails: exact answers are refused at once (no wait, no
    old table); with the previous content back, its table serves again."""
    server, client = started(private)
    before = exact_counts(client())
    target = private.paths.sandbox / "finance" / f"{CREDIT}.parquet"
    original = target.read_bytes()
    store_get = server.tables.store.get

    def failing(product, dataset, version):
        raise RuntimeError("protection failed (test)")

    monkeypatch.setattr(server.tables.store, "get", failing)
    replacement = target.with_name(".new")
    pl.read_parquet(target).head(5_000).write_parquet(replacement)
    os.replace(replacement, target)
    for _ in range(3):
        err = refused(lambda: exact_counts(client()))
        assert err.code is grpc.StatusCode.UNAVAILABLE and err.reason == "TABLE_NOT_READY"
    monkeypatch.setattr(server.tables.store, "get", store_get)
    # A third version is not refused for the second one's failure: its table is protected.
    pl.read_parquet(target).head(3_000).write_parquet(replacement)
    os.replace(replacement, target)
    third = when_ready(lambda: exact_counts(client()), "TABLE_NOT_READY")
    assert sum(third) <= 3_000
    replacement.write_bytes(original)
    os.replace(replacement, target)
    assert exact_counts(client()) == before


def test_a_file_replaced_by_one_that_no_longer_fits_its_entry_is_refused(private, started) -> None:
    """A new version is checked against the catalog before it is served."""
    server, client = started(private)
    counts(client())
    target = private.paths.sandbox / "finance" / f"{CREDIT}.parquet"
    replacement = target.with_name(".new")
    pl.read_parquet(target).drop("size_band").write_parquet(replacement)
    os.replace(replacement, target)
    err = refused(lambda: counts(client(), variant=1))
    assert err.reason == "DATASET_UNAVAILABLE" and "size_band" not in err.message
    target.write_bytes(b"not parquet at all")
    assert refused(lambda: counts(client(), variant=2)).reason == "DATASET_UNAVAILABLE"


def fixed_width(table, path: Path) -> None:
    """Plain encoding, no statistics: changing an integer column keeps the file's size."""
    pq.write_table(table, path, compression="none", use_dictionary=False, write_statistics=False)


@ON_OFF
def test_a_release_on_replaced_data_is_not_reused_even_with_the_same_size_and_mtime(private, started, monkeypatch,
                                                                                    control):  # fmt: skip
    """Attack: replace the registry with other data of the same size and mtime; a server
    that knows files by (size, mtime) keeps answering from releases made on the old data.
    Control: data versions are content hashes, re-hashed when inode or ctime change."""
    target = private.paths.sandbox / "finance" / f"{CREDIT}.parquet"
    table = pq.read_table(target)
    fixed_width(table, target)
    server, client = started(private)
    if control == "off":
        monkeypatch.setattr(server.sandbox.versions, "_signature", lambda st: (st.st_size, st.st_mtime_ns))
        monkeypatch.setattr(server.sandbox.versions, "recheck_seconds", float("inf"))

    def penalties():
        return client().query(CREDIT, aggregates=[total("penalties", "p")], mode="dp", epsilon=1.0)

    before = os.stat(target)
    first = penalties()
    zeroed = table.set_column(
        table.schema.get_field_index("penalties"),
        "penalties",
        pa.array([0] * table.num_rows, table.schema.field("penalties").type),
    )
    replacement = target.with_name(".new")
    fixed_width(zeroed, replacement)
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, target)
    after = os.stat(target)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = penalties()
    if control == "on":  # a new data version: a new release, on the new data, paid for
        assert not second.reused and abs(second.frame["p"][0]) < 200 < first.frame["p"][0]
        assert server.ledger.spent("city-bank", CREDIT).epsilon == pytest.approx(2.0)
    else:  # the stale release of the old data
        assert second.reused and second.frame.equals(first.frame)


# --- one cap per content ----------------------------------------------------------------------


def add_twin(config, *, copy_bytes: bool = True) -> Path:
    """A second catalog entry, `credit_twin`, over a copy of the credit registry, granted to city-bank."""
    entry = config.paths.catalog / f"{CREDIT}.toml"
    text = entry.read_text().replace(f'id = "{CREDIT}"', 'id = "credit_twin"')
    text = text.replace(f'location = "finance/{CREDIT}.parquet"', 'location = "finance/credit_twin.parquet"')
    (config.paths.catalog / "credit_twin.toml").write_text(text)
    twin = config.paths.sandbox / "finance" / "credit_twin.parquet"
    source = config.paths.sandbox / "finance" / f"{CREDIT}.parquet"
    if copy_bytes:
        shutil.copyfile(source, twin)
    else:  # the same schema, other content
        pl.read_parquet(source).head(5000).write_parquet(twin)
    policy = config.paths.policies / "city-bank.toml"
    grants = policy.read_text()
    block = grants[grants.index("[[grants]]") :]
    twin_grant = block.replace(f'dataset = "{CREDIT}"', 'dataset = "credit_twin"')
    # The twin has no published table: its grant is DP only.
    twin_grant = twin_grant.replace('modes = ["aggregate", "dp"]', 'modes = ["dp"]')
    twin_grant = re.sub(r"(?m)^tables = .*\n", "", twin_grant)
    policy.write_text(grants + "\n" + twin_grant)
    return twin


@ON_OFF
def test_two_entries_over_the_same_content_do_not_double_the_cap(private, started, monkeypatch, control):
    """Attack: catalogue the same file content twice (a copy under another name); each
    entry has its own dataset cap, so the data is spent to twice its cap. Control: two
    entries whose files hash alike are refused at load, naming both files."""
    for entry in (CREDIT, "credit_twin"):
        if entry == "credit_twin":
            add_twin(private)
        set_epsilon(private.paths.catalog / f"{entry}.toml", 2.0, table="budget")
    set_epsilon(private.paths.policies / "city-bank.toml", 2.0)  # both grants, within each cap
    if control == "off":
        monkeypatch.setattr(DataVersions, "_refuse_twins", lambda self, dataset, version: None)
    if control == "on":
        with pytest.raises(
            CatalogError, match=r"\.toml: location: '[a-z_/]+\.parquet' holds the same data"
        ) as err:
            build_server(private)
        assert "credit_twin.toml" in str(err.value) and f"{CREDIT}.toml" in str(err.value)
        return
    server, client = started(private)
    counts(client(), epsilon=2.0)
    assert refused(lambda: counts(client(), epsilon=2.0, variant=21)).reason == "BUDGET_EXHAUSTED"  # the cap
    counts(client(), "credit_twin", epsilon=2.0)  # the same data, answered again
    spent = server.ledger.dataset_spent(CREDIT).epsilon + server.ledger.dataset_spent("credit_twin").epsilon
    assert spent == pytest.approx(4.0)  # twice the cap of 2 on one content


def test_the_same_file_under_two_entries_is_refused_at_load(private) -> None:
    add_twin(private)
    twin = private.paths.sandbox / "finance" / "credit_twin.parquet"
    twin.unlink()
    twin.symlink_to(f"{CREDIT}.parquet")
    with pytest.raises(CatalogError, match=r"\.toml: location: .* is the same file as") as err:
        load_catalog(private.paths.catalog, private.paths.sandbox)
    assert "credit_twin.toml" in str(err.value) and f"{CREDIT}.toml" in str(err.value)


def test_a_file_changed_into_another_entrys_content_while_serving_refuses_both(private, started) -> None:
    twin = add_twin(private, copy_bytes=False)
    server, client = started(private)
    counts(client(), "credit_twin")
    replacement = twin.with_name(".twin")
    shutil.copyfile(private.paths.sandbox / "finance" / f"{CREDIT}.parquet", replacement)
    os.replace(replacement, twin)
    for dataset in ("credit_twin", CREDIT):
        err = refused(lambda dataset=dataset: counts(client(), dataset, variant=25))
        assert err.reason == "DATASET_UNAVAILABLE" and err.code is grpc.StatusCode.FAILED_PRECONDITION
        assert "credit_twin" not in err.message or dataset == "credit_twin"  # no word of the other entry
    # The operator fixes it: both serve again.
    pl.read_parquet(twin).head(4000).write_parquet(replacement)
    os.replace(replacement, twin)
    for dataset in ("credit_twin", CREDIT):
        counts(client(), dataset, variant=26)


# --- DP off until the operator sets max_rows ------------------------------------------------


def test_dp_is_refused_on_an_entry_without_max_rows_and_exact_answers_still_work(private, started) -> None:
    entry = private.paths.catalog / f"{CREDIT}.toml"
    entry.write_text(entry.read_text().replace("max_rows = 1\n", ""))
    server, client = started(private)
    for attempt in (
        lambda: counts(client()),
        lambda: client().estimate(CREDIT, aggregates=[count()], mode="dp", epsilon=1.0),
    ):
        err = refused(attempt)
        assert err.code is grpc.StatusCode.PERMISSION_DENIED and err.rule == "catalog.privacy_unit.max_rows"
        assert "max_rows" in err.message
    assert server.ledger.spent("city-bank", CREDIT) == PrivacyLoss(0.0, 0.0)
    assert not list((private.paths.state / "prepared").glob(f"{CREDIT}-*"))  # no copy made either
    assert client().query(CREDIT, aggregates=[count()], group_by=["size_band"]).frame.height == 4
    assert client().describe(CREDIT).dataset.max_rows_per_unit == 0


# --- release reuse per consumer ---------------------------------------------------------------


def grant_river_bank_dp(config, epsilon: float) -> None:
    policy = config.paths.policies / "river-bank.toml"
    policy.write_text(
        policy.read_text().replace('modes = ["aggregate"]', 'modes = ["aggregate", "dp"]')
        + '\n[grants.columns]\ndistrict = ["dimension", "filter"]\nsize_band = ["dimension", "filter"]\n'
        'penalties = ["measure"]\n'
    )
    set_epsilon(policy, epsilon)


def shared_key(original):
    """The control switched off: the release key leaves the consumer out."""
    return lambda consumer, plan, data_version: original("anyone", plan, data_version)


@ON_OFF
def test_another_consumers_paid_release_is_never_handed_out(private, started, monkeypatch, control):
    """Attack: river-bank, with too little budget for the question, asks exactly what it
    suspects city-bank asked. With releases reused across consumers it gets city-bank's
    paid answer for free, and "answered" vs BUDGET_EXHAUSTED tells it which questions its
    competitor asked. Control: the release key includes the consumer."""
    grant_river_bank_dp(private, epsilon=0.1)
    server, client = started(private)
    if control == "off":
        monkeypatch.setattr(server.sandbox.releases, "key", shared_key(server.sandbox.releases.key))
    paid = counts(client("city-bank"))
    if control == "on":
        asked = refused(lambda: counts(client("river-bank")))
        never_asked = refused(lambda: counts(client("river-bank"), variant=7))
        # The same refusal whether or not anyone asked: nothing says city-bank did.
        assert (asked.code, asked.reason, asked.message, asked.quota_violations) == (
            never_asked.code,
            never_asked.reason,
            never_asked.message,
            never_asked.quota_violations,
        )
        assert asked.reason == "BUDGET_EXHAUSTED"
    else:
        leaked = counts(client("river-bank"))
        assert leaked.reused and leaked.frame.equals(paid.frame) and leaked.spend.epsilon == 0.0
        assert refused(lambda: counts(client("river-bank"), variant=7)).reason == "BUDGET_EXHAUSTED"
    assert server.ledger.spent("river-bank", CREDIT) == PrivacyLoss(0.0, 0.0)


def test_another_consumers_identical_question_gets_its_own_release_charged_to_it(private, started) -> None:
    grant_river_bank_dp(private, epsilon=1.0)
    server, client = started(private)
    city = counts(client("city-bank"))
    river = counts(client("river-bank"))
    fresh = counts(client("river-bank"), variant=7)  # a question nobody asked before
    # Its answer to city-bank's question reads like one to a fresh question: own noise, own charge.
    assert not river.reused and not fresh.reused
    assert river.spend.epsilon == fresh.spend.epsilon == pytest.approx(0.5)
    assert not river.frame.equals(city.frame)
    assert server.ledger.spent("river-bank", CREDIT).epsilon == pytest.approx(1.0)
    assert server.ledger.dataset_spent(CREDIT).epsilon == pytest.approx(1.5)  # both count against the cap
    again = counts(client("river-bank"))  # its own question again: its own release, free
    assert again.reused and again.frame.equals(river.frame) and again.spend.epsilon == 0.0
    assert counts(client("city-bank")).frame.equals(city.frame)
