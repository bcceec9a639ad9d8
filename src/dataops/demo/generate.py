"""Deterministic synthetic demo data: an enterprise credit registry and medical claims.

Everything is drawn from `numpy.random.default_rng(seed)` with whole-column numpy
operations, so the same seed gives the same values and the default size (200k
enterprises, 1M claims) takes a few seconds. The values are realistic in shape —
skewed categories, heavy-tailed money, a few dominant units, some tiny groups — so
the privacy controls have something to bite on, but clearly synthetic: ids use the
non-existent province code 99, districts belong to no real city.

The category tuples below are the public key sets that `catalog/*.toml` lists; the
tests check the two agree. Numeric values are clipped to the catalog bounds.

    python -m dataops.demo.generate [SANDBOX_DIR]   # default size, prints timings
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ENTERPRISE_CREDIT = "enterprise_credit"
MEDICAL_CLAIMS = "medical_claims"
LOCATIONS = {
    ENTERPRISE_CREDIT: "finance/enterprise_credit.parquet",
    MEDICAL_CLAIMS: "insurance/medical_claims.parquet",
}

# Central districts first: they hold most registered enterprises; people live more evenly.
DISTRICTS = (
    "Dongcheng", "Xicheng", "Nanhu", "Beishan", "Jiangbin",
    "Gaoxin", "Binhai", "Qingshan", "Hexi", "Lingang",
)  # fmt: skip
_ENTERPRISE_DISTRICT_P = (0.20, 0.17, 0.13, 0.11, 0.10, 0.09, 0.07, 0.05, 0.045, 0.035)
_RESIDENT_DISTRICT_P = (0.08, 0.07, 0.12, 0.12, 0.11, 0.10, 0.09, 0.11, 0.10, 0.10)

INDUSTRIES = (
    "Manufacturing", "Wholesale & Retail", "Construction", "IT & Software", "Catering",
    "Logistics", "Real Estate", "Finance", "Agriculture", "Healthcare",
)  # fmt: skip
_INDUSTRY_P = (0.16, 0.30, 0.10, 0.09, 0.10, 0.08, 0.04, 0.02, 0.05, 0.06)
# Penalties per 3 years: site-safety (Construction) and food-hygiene (Catering) checks bite most.
_PENALTY_RATE = (0.20, 0.12, 0.55, 0.05, 0.45, 0.20, 0.25, 0.08, 0.10, 0.15)
_NAME_WORD = (
    "Manufacturing", "Trading", "Construction", "Technology", "Catering",
    "Logistics", "Property", "Capital", "Agriculture", "Medical",
)  # fmt: skip

SIZE_BANDS = ("micro", "small", "medium", "large")
_SIZE_P = (0.70, 0.22, 0.065, 0.015)

# (district, industry, most kept, where the rest move): cells so small that
# aggregate mode must suppress them — there are hardly any farms in the high-tech zone.
_RARE_CELLS = (
    ("Gaoxin", "Agriculture", 2, "Qingshan"),
    ("Xicheng", "Agriculture", 4, "Qingshan"),
    ("Lingang", "Finance", 3, "Dongcheng"),
)
# Mega enterprises, placed by hand. The first two are financial groups headquartered
# in the port district among a few dozen small firms, so SUM(tax_paid) there passes
# k but fails the (2, 85%) dominance rule.
_MEGAS = (
    ("Binhai", "Finance"), ("Binhai", "Finance"), ("Dongcheng", "Real Estate"),
    ("Xicheng", "Wholesale & Retail"), ("Gaoxin", "IT & Software"), ("Jiangbin", "Manufacturing"),
)  # fmt: skip
_DOMINANCE_CELL_OTHERS = 30

# Catalog bounds (catalog/enterprise_credit.toml); data is clipped to them.
CAPITAL_MAX = 2e9
TAX_MAX = 5e7
HEADCOUNT_MAX = 50_000
PENALTIES_MAX = 20
ARREARS_AMOUNT_MAX = 1e7
YEAR_MIN, YEAR_MAX = 1950, 2026

AGE_BANDS = ("0-17", "18-29", "30-44", "45-59", "60-74", "75+")
_AGE_P = (0.18, 0.14, 0.22, 0.22, 0.16, 0.08)
# Older people visit more; weighted by _AGE_P the mean is ~5 visits, so persons ≈ claims/5.
_MEAN_VISITS = (4.0, 2.5, 3.5, 5.0, 8.0, 10.0)
MAX_VISITS = 40  # catalog privacy_unit.max_rows for medical_claims
SEXES = ("F", "M")

VISIT_TYPES = ("outpatient", "inpatient", "emergency")
_VISIT_P_BY_AGE = (
    (0.86, 0.04, 0.10), (0.87, 0.04, 0.09), (0.87, 0.05, 0.08),
    (0.86, 0.07, 0.07), (0.82, 0.11, 0.07), (0.76, 0.15, 0.09),
)  # fmt: skip
HOSPITAL_LEVELS = ("primary", "secondary", "tertiary")
_LEVEL_P_BY_VISIT = ((0.50, 0.32, 0.18), (0.15, 0.45, 0.40), (0.20, 0.45, 0.35))

DIAGNOSIS_GROUPS = (
    "Respiratory", "Circulatory", "Digestive", "Musculoskeletal", "Neoplasms", "Endocrine",
    "Injury", "Mental", "Nervous", "Genitourinary", "Pregnancy", "Other",
)  # fmt: skip
_PREGNANCY = DIAGNOSIS_GROUPS.index("Pregnancy")
# Relative weights per age band (rows normalised later). Pregnancy only for 18-44.
_DIAGNOSIS_W_BY_AGE = (
    (35, 1, 12, 4, 0.5, 2, 14, 3, 4, 3, 0, 21.5),
    (20, 2, 12, 8, 1, 3, 12, 7, 4, 7, 10, 14),
    (16, 6, 12, 11, 2.5, 5, 9, 6, 5, 8, 8, 11.5),
    (12, 16, 11, 14, 5, 10, 7, 4, 6, 7, 0, 8),
    (10, 24, 9, 13, 9, 12, 5, 3, 6, 6, 0, 3),
    (11, 30, 8, 11, 10, 10, 6, 3, 7, 5, 0, 1),
)  # fmt: skip
_DIAGNOSIS_COST = (0.8, 1.4, 1.0, 1.0, 3.0, 1.1, 1.3, 1.2, 1.3, 1.0, 1.5, 0.9)
AMOUNT_MAX = 500_000.0
# Primary care is reimbursed at a higher rate, steering patients away from big hospitals.
_REIMBURSE_RATE = (0.85, 0.75, 0.62)

ROW_GROUP_ROWS = 256 * 1024


def generate(
    sandbox: Path, *, enterprises: int = 200_000, claims: int = 1_000_000, seed: int = 20261122
) -> dict[str, Path]:
    """Write both demo datasets as Parquet under `sandbox` and return {dataset_id: path}."""
    if enterprises < 100 or claims < 100:
        raise ValueError("the demo needs at least 100 enterprises and 100 claims")
    # Independent streams: resizing one dataset leaves the other's values unchanged.
    finance_rng, insurance_rng = np.random.default_rng(seed).spawn(2)
    frames = {
        ENTERPRISE_CREDIT: enterprise_credit(finance_rng, enterprises),
        MEDICAL_CLAIMS: medical_claims(insurance_rng, claims),
    }
    paths = {}
    for dataset_id, frame in frames.items():
        paths[dataset_id] = Path(sandbox) / LOCATIONS[dataset_id]
        _write_atomically(frame, paths[dataset_id])
    return paths


def enterprise_credit(rng: np.random.Generator, n: int) -> pl.DataFrame:
    """One row per enterprise: registry facts and credit indicators."""
    district = rng.choice(len(DISTRICTS), n, p=_ENTERPRISE_DISTRICT_P)
    industry = rng.choice(len(INDUSTRIES), n, p=_INDUSTRY_P)
    size = rng.choice(len(SIZE_BANDS), n, p=_SIZE_P)

    megas = rng.choice(n, len(_MEGAS), replace=False)
    district[megas] = [DISTRICTS.index(d) for d, _ in _MEGAS]
    industry[megas] = [INDUSTRIES.index(i) for _, i in _MEGAS]
    size[megas] = SIZE_BANDS.index("large")
    is_mega = np.zeros(n, bool)
    is_mega[megas] = True

    # Thin the dominance cell to a few dozen micro/small firms: one ordinary large
    # firm beside the two groups could otherwise dilute their share below 85%.
    d, i = _MEGAS[0]
    in_cell = (district == DISTRICTS.index(d)) & (industry == INDUSTRIES.index(i)) & ~is_mega
    kept = np.flatnonzero(in_cell & (size <= SIZE_BANDS.index("small")))[:_DOMINANCE_CELL_OTHERS]
    in_cell[kept] = False
    district[in_cell] = DISTRICTS.index("Dongcheng")

    for d, i, keep, move_to in _RARE_CELLS:
        in_cell = (district == DISTRICTS.index(d)) & (industry == INDUSTRIES.index(i))
        district[np.flatnonzero(in_cell)[keep:]] = DISTRICTS.index(move_to)

    # Young firms dominate a registry; bigger firms have had longer to grow.
    age = rng.exponential(np.array([7.0, 11.0, 16.0, 22.0])[size])
    year_founded = np.clip(YEAR_MAX - np.floor(age), YEAR_MIN, YEAR_MAX).astype(np.int64)

    # Capital is declared in round amounts (10k CNY units), log-normal within a band.
    capital_median = np.array([5e5, 3e6, 2.5e7, 1.2e8])[size]
    capital = capital_median * np.exp(rng.normal(0.0, 1.0, n))
    capital = np.clip(np.round(capital, -4), 1e4, CAPITAL_MAX)

    # Tax follows scale (band and capital) plus idiosyncratic profitability.
    tax = np.array([8e3, 1.2e5, 1.5e6, 5e6])[size] * np.sqrt(capital / capital_median)
    tax *= np.exp(rng.normal(0.0, 0.8, n))
    # Loss-making or exempt firms pay nothing; firms founded this year have no tax year yet.
    no_tax = rng.random(n) < np.array([0.20, 0.06, 0.02, 0.0])[size]
    tax[no_tax | (year_founded == YEAR_MAX)] = 0.0

    headcount_median = np.array([2.5, 30.0, 250.0, 1500.0])[size]
    headcount = np.round(headcount_median * np.exp(rng.normal(0.0, 0.7, n)))
    low, high = np.array([0, 10, 100, 200])[size], np.array([9, 99, 999, HEADCOUNT_MAX])[size]
    headcount = np.clip(headcount, low, high)
    # Many micro firms insure nobody (the owner is insured elsewhere).
    headcount[(size == 0) & (rng.random(n) < 0.12)] = 0

    # The mega enterprises sit at the top of every bound, far above their band's tail.
    k = len(megas)
    capital[megas] = np.round(rng.uniform(1e9, CAPITAL_MAX, k), -4)
    tax[megas] = rng.uniform(0.8 * TAX_MAX, TAX_MAX, k)
    headcount[megas] = rng.integers(15_000, HEADCOUNT_MAX, k, endpoint=True)
    tax = np.clip(np.round(tax, 2), 0.0, TAX_MAX)

    # Bigger firms are inspected more often.
    penalty_rate = np.array(_PENALTY_RATE)[industry] * np.array([0.8, 1.2, 2.0, 3.0])[size]
    penalties = np.minimum(rng.poisson(penalty_rate), PENALTIES_MAX)

    in_arrears = rng.random(n) < np.array([0.10, 0.07, 0.04, 0.02])[size]
    arrears_months = np.where(in_arrears, np.minimum(rng.geometric(0.35, n), 12), 0)
    monthly_bill = np.array([1.5e3, 8e3, 5e4, 2.5e5])[size] * np.exp(rng.normal(0.0, 0.8, n))
    arrears_amount = np.clip(np.round(arrears_months * monthly_bill, 2), 0.0, ARREARS_AMOUNT_MAX)

    return pl.DataFrame(
        {
            "enterprise_id": _credit_codes(rng, district),
            "name": _company_names(rng, district, industry, size),
            "district": _labels(DISTRICTS, district),
            "industry": _labels(INDUSTRIES, industry),
            "size_band": _labels(SIZE_BANDS, size),
            "year_founded": year_founded,
            "registered_capital": capital,
            "tax_paid": tax,
            "si_headcount": headcount.astype(np.int64),
            "penalties": penalties.astype(np.int64),
            "arrears_months": arrears_months.astype(np.int64),
            "arrears_amount": arrears_amount,
        }
    )


def medical_claims(rng: np.random.Generator, n: int) -> pl.DataFrame:
    """`n` claim rows for about n/5 persons, each with at most MAX_VISITS rows."""
    # Everyone drawn has at least one visit, so n candidates always cover n rows;
    # the unused tail is simply dropped.
    age = rng.choice(len(AGE_BANDS), n, p=_AGE_P)
    visits = np.minimum(rng.geometric(1.0 / np.array(_MEAN_VISITS)[age]), MAX_VISITS)
    persons = int(np.searchsorted(np.cumsum(visits), n)) + 1
    visits = visits[:persons]
    visits[-1] -= visits.sum() - n  # the last person's visits end where the year's claims do

    age = age[:persons]
    sex = (rng.random(persons) < 0.49).astype(np.int64)  # 1 = M
    district = rng.choice(len(DISTRICTS), persons, p=_RESIDENT_DISTRICT_P)
    person_number = rng.choice(10**9, persons, replace=False)

    person = np.repeat(np.arange(persons), visits)
    row_age, row_sex = age[person], sex[person]
    visit = _pick(rng, _VISIT_P_BY_AGE, row_age)
    level = _pick(rng, _LEVEL_P_BY_VISIT, visit)
    diagnosis_w = np.array(_DIAGNOSIS_W_BY_AGE, float)[None].repeat(2, axis=0)
    diagnosis_w[1, :, _PREGNANCY] = 0.0  # index 1 = M
    diagnosis_w = diagnosis_w.reshape(-1, len(DIAGNOSIS_GROUPS))
    diagnosis = _pick(rng, diagnosis_w, row_sex * len(AGE_BANDS) + row_age)

    median = np.array([260.0, 11_000.0, 850.0])[visit] * np.array([0.6, 1.0, 1.8])[level]
    median *= np.array(_DIAGNOSIS_COST)[diagnosis]
    amount = median * np.exp(rng.normal(0.0, 1.0, n) * np.array([0.8, 1.0, 0.9])[visit])
    amount = np.clip(np.round(amount, 2), 5.0, AMOUNT_MAX)
    rate = np.clip(np.array(_REIMBURSE_RATE)[level] + rng.uniform(-0.05, 0.05, n), 0.5, 0.9)
    reimbursed = np.floor(amount * rate * 100) / 100  # payouts round down, so never above 90%

    day = rng.integers(0, 365, n)
    # A claims log reads in date order, and claim numbers follow it.
    order = np.argsort(day, kind="stable")
    person, day = person[order], day[order]
    visit, level, diagnosis = visit[order], level[order], diagnosis[order]
    amount, reimbursed = amount[order], reimbursed[order]

    return pl.DataFrame(
        {
            "claim_id": "C2025" + _digits(np.arange(1, n + 1), 8),
            "person_id": "P" + _digits(person_number[person], 9),
            "age_band": _labels(AGE_BANDS, age[person]),
            "sex": _labels(SEXES, sex[person]),
            "district": _labels(DISTRICTS, district[person]),
            "visit_date": np.datetime64("2025-01-01") + day.astype("timedelta64[D]"),
            "visit_type": _labels(VISIT_TYPES, visit),
            "hospital_level": _labels(HOSPITAL_LEVELS, level),
            "diagnosis_group": _labels(DIAGNOSIS_GROUPS, diagnosis),
            "amount": amount,
            "reimbursed": reimbursed,
        }
    )


def _pick(rng: np.random.Generator, probabilities, row: np.ndarray) -> np.ndarray:
    """One category index per element, from the probability row `row` selects."""
    p = np.asarray(probabilities, float)
    cdf = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
    cdf[:, -1] = 1.0  # rounding must not leave a sliver above the last category
    u = rng.random(len(row))
    # Counting the cdf steps at or below u is inverse-CDF sampling, vectorised over rows.
    return (cdf[row] <= u[:, None]).sum(axis=1)


def _labels(names: tuple[str, ...], index: np.ndarray) -> pl.Series:
    return pl.Series(names).gather(index)


def _digits(numbers: np.ndarray, width: int) -> pl.Series:
    return pl.Series(numbers).cast(pl.String).str.zfill(width)


# GB 32100-2015 alphabet: digits and capitals without I, O, S, V, Z.
_CODE_ALPHABET = np.frombuffer(b"0123456789ABCDEFGHJKLMNPQRTUWXY", np.uint8)
_CODE_WEIGHTS = np.array([pow(3, i, 31) for i in range(17)])


def _credit_codes(rng: np.random.Generator, district: np.ndarray) -> pl.Series:
    """Unique 18-char unified-social-credit-code look-alikes with a valid check char."""
    n = len(district)
    digits = np.empty((n, 18), np.int64)
    digits[:, 0:2] = [9, 1]  # registered with market regulation; an enterprise
    digits[:, 2:6] = [9, 9, 0, 1]  # province 99 does not exist: never a real code
    digits[:, 6] = (district + 1) // 10
    digits[:, 7] = (district + 1) % 10
    serial = rng.choice(31**9, n, replace=False)  # unique without a retry loop
    for position in range(16, 7, -1):  # 9 columns, not rows
        serial, digits[:, position] = np.divmod(serial, 31)
    digits[:, 17] = (31 - (digits[:, :17] @ _CODE_WEIGHTS) % 31) % 31
    return pl.Series(_CODE_ALPHABET[digits].view("S18").ravel()).cast(pl.String)


_BRAND_HEAD = (
    "Heng", "Xin", "Hua", "Tai", "Long", "Sheng", "Rui", "Jin", "Feng", "Yuan",
    "Kang", "Da", "Bo", "Hong", "Mei", "Tian", "Yi", "Cheng", "Fu", "Jia",
)  # fmt: skip
_BRAND_TAIL = (
    "tong", "fa", "xing", "an", "chang", "da", "li", "kai",
    "hui", "bang", "yu", "ming", "hai", "shun", "de", "qi",
)  # fmt: skip


def _company_names(rng, district, industry, size) -> pl.Series:
    """'<District> <Brand> <Trade> Co., Ltd.', as Chinese company names are built."""
    n = len(district)
    parts = pl.DataFrame(
        {
            "district": _labels(DISTRICTS, district),
            "head": _labels(_BRAND_HEAD, rng.integers(0, len(_BRAND_HEAD), n)),
            "tail": _labels(_BRAND_TAIL, rng.integers(0, len(_BRAND_TAIL), n)),
            "trade": _labels(_NAME_WORD, industry),
            "form": _labels(("Co., Ltd.", "Group Co., Ltd."), (size == 3).astype(np.int64)),
        }
    )
    return parts.select(pl.format("{} {}{} {} {}", *parts.columns)).to_series().alias("name")


def _write_atomically(frame: pl.DataFrame, path: Path) -> None:
    """Write to a temp file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            frame.write_parquet(f, compression="zstd", row_group_size=ROW_GROUP_ROWS)
            f.flush()
            os.fsync(f.fileno())  # the rename must not outlive the data on a power cut
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


if __name__ == "__main__":
    # A hand-run timing check at the default size, not a test.
    target = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dataops-demo-"))
    started = time.perf_counter()
    for dataset_id, written in generate(target).items():
        print(f"{dataset_id}: {written} ({written.stat().st_size / 1e6:.1f} MB)")
    print(f"generated in {time.perf_counter() - started:.2f}s")
