"""zCDP across releases: what a grant is charged when the ledger composes rho, against
converting each release on its own and adding the epsilons (the baseline, same run).

    PYTHONPATH=src python benchmarks/bench_zcdp_ledger.py [--epsilon 0.1] [--delta 1e-6]

Each release has the rho that OpenDP converts to `--epsilon` on its own at `--delta`;
N releases go through a real `Ledger` (a temporary SQLite file). Printed per N: the
total charged, the baseline N * epsilon, and their ratio; then how many releases a grant
of epsilon 1.0 and 5.0 answers each way, and the time of one zCDP reservation.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dataops.engines.dp_calibrate import rho_for_epsilon, zcdp_to_epsilon
from dataops.ledger import BudgetExhaustedError, Ledger
from dataops.values import PrivacyLoss


def admitted(ledger: Ledger, consumer: str, rho: float, total: PrivacyLoss) -> int:
    count = 0
    while True:
        try:
            ledger.reserve_zcdp(
                consumer, "claims", rho, grant_total=total, dataset_total=PrivacyLoss(1e6, 1.0)
            )
        except BudgetExhaustedError:
            return count
        count += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=1e-6)
    args = parser.parse_args()
    rho = rho_for_epsilon(args.epsilon, args.delta)
    single = zcdp_to_epsilon(rho, args.delta)
    with tempfile.TemporaryDirectory() as tmp, Ledger(Path(tmp) / "ledger.db") as ledger:
        print(f"one release: rho {rho:.6g}, epsilon {single:.6g} at delta {args.delta:g}")
        print(f"{'releases':>9} {'composed':>10} {'separately':>11} {'ratio':>7}")
        done, started = 0, time.perf_counter()
        for n in (1, 5, 20, 100, 500):
            while done < n:
                ledger.reserve_zcdp(
                    "bank",
                    "claims",
                    rho,
                    grant_total=PrivacyLoss(1e6, args.delta),
                    dataset_total=PrivacyLoss(1e6, 1.0),
                )
                done += 1
            composed = ledger.spent("bank", "claims").epsilon
            print(f"{n:>9} {composed:>10.4f} {n * single:>11.4f} {composed / (n * single):>7.3f}")
        per_reservation = (time.perf_counter() - started) / done
        for budget in (1.0, 5.0):
            composed = admitted(ledger, f"composed-{budget}", rho, PrivacyLoss(budget, args.delta))
            print(
                f"grant of epsilon {budget:g}: {composed} releases composed, {int(budget / single)} separately"
            )
        print(f"one zCDP reservation (OpenDP conversion + SQLite commit): {per_reservation * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
