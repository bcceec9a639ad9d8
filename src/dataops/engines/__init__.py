"""Engines turn an authorized query into a result table.

Each engine is one module implementing `Engine` (estimate → cost and accuracy;
release → result): the exact-answer engine over protected tables (`table`), the DP
engine (`dp_engine`, over OpenDP measurements built in `dp`), and the subject engine
(`subject`, per-subject indicators under consent). Adding an engine is adding a module
(as Ibis does with backends).
"""

from dataops.engines._base import AggregateAccuracy, Engine, EngineEstimate, EngineResult, Plan, Spend

__all__ = ["AggregateAccuracy", "Engine", "EngineResult", "EngineEstimate", "Plan", "Spend"]
