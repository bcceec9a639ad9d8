"""Engines turn an authorized query into a result table.

Each engine is one module with one entry point taking a `Plan` and returning an
`EngineResult`; adding an engine is adding a module (as Ibis does with backends).
"""

from dataops.engines._base import AggregateAccuracy, EngineResult, Plan, Spend

__all__ = ["AggregateAccuracy", "EngineResult", "Plan", "Spend"]
