"""`dataops init DIR`: a working directory that `dataops serve` runs as it is.

    DIR/dataops.toml     listen address and paths (relative to DIR)
    DIR/catalog/         one TOML entry per dataset (`dataops ingest` writes them)
    DIR/policies/        one TOML policy per consumer
    DIR/products/        table and subject products
    DIR/sandbox/         the raw Parquet files
    DIR/state/           audit log, ledger and state/pki: the CA and the server certificate

The examples are written with a `.example` suffix, so nothing is served until the
operator copies one into place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from dataops.certs import init_authority
from dataops.config import parse_listen

CONFIG = """\
# dataops server configuration; paths are relative to this file.
[server]
listen = {listen}

[paths]
catalog = "catalog"
policies = "policies"
products = "products"
sandbox = "sandbox"
state = "state"

# [tls] defaults to state/pki/ca.crt, server.crt and server.key (`dataops certs init`).
"""

CATALOG_EXAMPLE = """\
# Copy to catalog/loans.toml (the id must equal the file name) and describe the data.
id = "loans"
zone = "finance"
title = "Loans"
provider = "the provider"
location = "loans.parquet"          # under sandbox/

[privacy_unit]
column = "loan_id"
max_rows = 1

[budget]                            # the dataset's DP cap over every consumer
epsilon = 10.0
delta = 1e-6

[columns.loan_id]
type = "string"
classification = "identifier"

[columns.district]
type = "string"
classification = "quasi_identifier"
keys = ["north", "south"]           # a public key set: what a published table's cells are

[columns.amount]
type = "float"
classification = "sensitive"
bounds = [0, 1000000]
"""

POLICY_EXAMPLE = """\
# Copy to policies/city-bank.toml (the consumer must equal the file name and the
# certificate's name: `dataops certs issue city-bank`).
consumer = "city-bank"
zone = "finance"

[[grants]]
dataset = "loans"
purpose = "credit-risk"
expires = 2027-12-31
modes = ["aggregate", "dp"]
functions = ["count", "count_units", "sum", "mean", "quantile"]   # what DP queries may compute
tables = ["loans_by_district"]    # exact answers: lookups in these published tables (products/)

[grants.budget]
epsilon = 2.0
delta = 1e-7

[grants.columns]                  # DP mode
district = ["dimension", "filter"]
amount = ["measure"]
"""

PRODUCT_EXAMPLE = """\
# Copy to products/loans_by_district.toml (the id must equal the file name): a table
# protected once per data version; grants name it in `tables`.
kind = "table"
id = "loans_by_district"
dataset = "loans"
title = "Loans and amounts by district"
dimensions = ["district"]

[[measures]]
function = "count"
[[measures]]
function = "sum"
column = "amount"
[[measures]]
function = "mean"
column = "amount"

[rules]
min_units = 10                      # a cell of fewer loans is not published
"""


def scaffold(
    directory: Path,
    *,
    server_names: Iterable[str] = (),
    ips: Iterable[str] = (),
    listen: str = "127.0.0.1:50051",
) -> list[str]:
    """Create the layout above; refuses a directory that already has a dataops.toml."""
    directory = Path(directory)
    parse_listen(listen)  # ValueError: the CLI reports it
    if (directory / "dataops.toml").exists():
        raise FileExistsError(
            f"{directory / 'dataops.toml'} already exists; not overwriting a working directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    for name in ("catalog", "policies", "products", "sandbox", "state"):
        (directory / name).mkdir(exist_ok=True)
        made.append(f"{name}/")
    (directory / "catalog" / "loans.toml.example").write_text(CATALOG_EXAMPLE)
    (directory / "policies" / "city-bank.toml.example").write_text(POLICY_EXAMPLE)
    (directory / "products" / "loans_by_district.toml.example").write_text(PRODUCT_EXAMPLE)
    names = ["localhost", *[n for n in server_names if n != "localhost"]]
    addresses = ["127.0.0.1", "::1", *[i for i in ips if i not in ("127.0.0.1", "::1")]]
    init_authority(directory / "state" / "pki", server_names=names, server_ips=addresses)
    made.append("state/pki (CA and server certificate for " + ", ".join(names + addresses) + ")")
    (directory / "dataops.toml").write_text(CONFIG.format(listen=json.dumps(listen)))
    return ["dataops.toml", *made]
