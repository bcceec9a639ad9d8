"""`dataops policy check`: everything `dataops serve` checks at start, every error at once.

`serve` stops at the first mistake; an operator fixing files wants the whole list.
So each file is loaded on its own and its errors are collected: the configuration,
every catalog entry and its Parquet file (exists, columns and types match), every
policy file against the catalog entries that loaded, the products, and the TLS files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from dataops.config import ServerConfig
from dataops.errors import LoadError


@dataclass
class CheckReport:
    summary: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, error: Exception | str) -> None:
        # A loader may report several problems of one file, one per line.
        self.errors.extend(line for line in str(error).splitlines() if line.strip())


def _every_grant_error(path: Path, catalog, first: LoadError, products=None) -> list[str]:
    """The loader stops at a file's first error; grants are independent, so load each on its own.

    Each grant is checked in a copy of the file holding only that grant (and the file's
    other keys); its messages are renamed back to `grants[i]`. Without this an operator
    fixes one grant, reruns, and meets the next.
    """
    import tomllib

    import tomli_w

    from dataops.policy import _load_policy

    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return [str(first)]
    grants = doc.get("grants")
    if not isinstance(grants, list) or len(grants) < 2 or not all(isinstance(g, dict) for g in grants):
        return [str(first)]
    top = {k: v for k, v in doc.items() if k != "grants"}
    # Ordered, without repeats (a top-level error shows in every copy); the whole file's own
    # first error leads, since only it sees what spans grants (two grants on one dataset).
    errors: dict[str, None] = dict.fromkeys(str(first).splitlines())
    for i, grant in enumerate([None, *grants]):
        one = {**top, "grants": [] if grant is None else [grant]}
        try:
            _load_policy(path, tomli_w.dumps(one).encode("utf-8"), catalog, products)
        except LoadError as exc:
            for line in str(exc).splitlines():
                errors[
                    line.replace(": grants[0]", f": grants[{i - 1}]", 1) if grant is not None else line
                ] = None
    return list(errors)


def check_all(config: ServerConfig, *, policies_dir: Path | None = None) -> CheckReport:
    from dataops.catalog import Catalog, check_data, load_entry
    from dataops.policy import PolicySet, _load_policy

    report = CheckReport()
    paths = config.paths

    datasets = {}
    if not paths.catalog.is_dir():
        report.add(f"{paths.catalog}: catalog directory does not exist")
    else:
        for path in sorted(paths.catalog.glob("*.toml")):
            try:
                dataset = load_entry(path, paths.sandbox)
            except LoadError as exc:
                report.add(exc)
                continue
            # A valid entry still checks its policies, whatever its data says.
            datasets[dataset.id] = dataset
            try:
                check_data(dataset)  # the Parquet file exists and its types match the entry
            except LoadError as exc:
                report.add(exc)
    catalog = Catalog(MappingProxyType(datasets))

    products = None  # the table products grants name; checked (and reported) here first
    try:
        from dataops.products import load_products

        products = load_products(paths.products, catalog)
    except LoadError as exc:
        report.add(exc)

    policy_dir = policies_dir or paths.policies
    consumers = {}
    if not policy_dir.is_dir():
        report.add(f"{policy_dir}: policy directory does not exist")
    else:
        for path in sorted(policy_dir.glob("*.toml")):
            try:
                policy = _load_policy(path, path.read_bytes(), catalog, products)
            except OSError as exc:
                report.add(f"{path}: cannot be read: {exc.strerror}")
                continue
            except LoadError as exc:
                report.add("\n".join(_every_grant_error(path, catalog, exc, products)))
                continue
            consumers[policy.consumer] = policy

    for name in ("ca_cert", "server_cert", "server_key"):
        path = getattr(config.tls, name)
        if not path.is_file():
            report.add(f"[tls] {name}: {path} does not exist (run `dataops certs init`)")

    for policy in sorted(consumers.values(), key=lambda p: p.consumer):
        state = "REVOKED" if policy.revoked else "ok"
        grants = (
            ", ".join(
                f"{g.dataset} ({'/'.join(sorted(m.value for m in g.modes))}, until {g.expires})"
                for g in policy.grants.values()
            )
            or "no grants"
        )
        report.summary.append(f"{state:7} {policy.consumer:20} zone {policy.zone}: {grants}")
    if not report.errors:
        from dataops.policy import load_policies

        policies: PolicySet = load_policies(policy_dir, catalog, products)  # the version `serve` would record
        report.summary.append(
            f"{len(policies.consumers)} policies valid against {len(catalog.datasets)} catalog "
            f"entries and their data; version {policies.version[:12]}"
        )
    return report
