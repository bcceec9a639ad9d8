"""SQL text → the query IR, through sqlglot.

A consumer may write its question as one SQL SELECT instead of a structured
`Query`. The text is parsed here into the very `dataops.ir.Query` the structured
form produces, so authorisation, budgets, audit and DP release reuse cannot tell
the two apart: the SQL surface adds no path around any control. Mode, privacy and
purpose are not SQL: they travel beside the text (`SqlQuery` in query.proto), the
way SmartNoise SQL and Lomas take the privacy terms apart from the query.

The grammar is deliberately small, the structured query's and nothing more:

    SELECT <group column>, ..., <aggregate> [AS <alias>], ...
    FROM <dataset>
    [WHERE <predicate> AND <predicate> ...]
    [GROUP BY <group column>, ...]

    aggregate := COUNT(*) | COUNT(DISTINCT <privacy unit>) | SUM(<col>) | AVG(<col>)
               | MEDIAN(<col>) | QUANTILE(<col>, <q>)
               | PERCENTILE_CONT(<q>) WITHIN GROUP (ORDER BY <col>)
    predicate := <col> = <value> | <col> IN (<value>, ...) | <col> BETWEEN <a> AND <b>
               | <col> >= <value> | <col> <= <value>
    value     := 'string' | integer | decimal | TRUE | FALSE | DATE 'YYYY-MM-DD'

Anything else (OR, NOT, joins, subqueries, HAVING, ORDER BY, LIMIT, expressions
inside aggregates, ...) is refused with an `InvalidQuery` whose message and field
violation (`sql.text`) give the line and column of the offending token.

>>> q = parse("SELECT district, COUNT(*) FROM enterprise_credit GROUP BY district",
...           mode=ir.Mode.DP, privacy=ir.Privacy(epsilon=1.0))
>>> q.group_by, [a.name for a in q.aggregates]
(('district',), ['count'])
>>> parse("SELECT COUNT(*) FROM t WHERE a > 1", mode=ir.Mode.AGGREGATE)
Traceback (most recent call last):
...
dataops.errors.InvalidQuery: sql.text: line 1, column 32: only =, IN, BETWEEN, >= and <= filters are supported, not >
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import Tokenizer

from dataops import ir
from dataops.errors import FieldViolation, InvalidQuery

FIELD = "sql.text"
# Hostile input is refused before sqlglot sees it: the longest legitimate question
# (limits.max_in_values values in a few IN lists) is far shorter.
MAX_SQL_LENGTH = 32_768

# The privacy-unit column of a dataset the caller can see, or None (then the
# dataset's authorisation refuses the query, with nothing said about the unit).
UnitColumn = Callable[[str], "str | None"]


class _Where:
    """A 1-based line and column in the SQL text."""

    def __init__(self, line: int, column: int) -> None:
        self.line, self.column = line, column

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}"


def _fail(where: _Where, description: str) -> InvalidQuery:
    text = f"{where}: {description}"
    return InvalidQuery(f"{FIELD}: {text}", rule="sql", field_violations=(FieldViolation(FIELD, text),))


def _unterminated_quote(text: str) -> int | None:
    """The offset of a quote that opens a string or identifier and is never closed."""
    open_at, quote = None, ""
    i = 0
    while i < len(text):
        char = text[i]
        if open_at is None and char in "'\"`":
            open_at, quote = i, char
        elif open_at is not None and char == quote:
            if text[i + 1 : i + 2] == quote:  # a doubled quote is an escaped one
                i += 1
            else:
                open_at = None
        i += 1
    return open_at


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        try:
            self.tokens = Tokenizer().tokenize(text)
        except TokenError:
            # sqlglot's tokenizer says nothing about where; an open quote is the usual cause.
            start = _unterminated_quote(text)
            if start is None:
                raise _fail(_Where(1, 1), "cannot split the text into tokens") from None
            raise _fail(
                self._offset_to_where(start), f"the quoted text starting here ({text[start]}) never ends"
            ) from None

    # --- positions --------------------------------------------------------------

    def _offset_to_where(self, offset: int) -> _Where:
        line = self.text.count("\n", 0, offset) + 1
        column = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return _Where(line, column)

    def where(self, node: exp.Expression | None, keyword: str | None = None) -> _Where:
        """The position of a node's offending token.

        sqlglot locates identifiers and some literals only, so: the keyword (an operator, a function
        or clause name) nearest the node's first located token; else that token;
        else the keyword's first occurrence; else the start of the text.
        """
        offset = None
        if node is not None:
            starts = [
                n.meta["start"] for n in node.walk() if isinstance(n, exp.Expression) and "start" in n.meta
            ]
            offset = min(starts, default=None)
        if keyword is not None:
            starts = [t.start for t in self.tokens if t.text.upper() == keyword]
            if starts:
                return self._offset_to_where(
                    min(starts, key=lambda s: abs(s - offset)) if offset is not None else starts[0]
                )
        return self._offset_to_where(offset) if offset is not None else _Where(1, 1)

    def fail(self, node: exp.Expression | None, description: str, keyword: str | None = None) -> InvalidQuery:
        return _fail(self.where(node, keyword), description)

    # --- pieces -----------------------------------------------------------------

    def column(self, node: exp.Expression, table: str, what: str) -> str:
        if not isinstance(node, exp.Column) or not isinstance(node.this, exp.Identifier):
            raise self.fail(node, f"{what} must be a plain column name, not {node.sql()!r}")
        if node.table and node.table != table:
            raise self.fail(node, f"column {node.sql()!r} names a table other than {table!r}")
        return node.name

    def value(self, node: exp.Expression, owner: exp.Expression) -> ir.Scalar:
        negative = False
        if isinstance(node, exp.Neg):
            negative, node = True, node.this
        if isinstance(node, exp.Literal) and not node.is_string:
            text = node.this
            try:
                number: int | float = int(text)
            except ValueError:
                number = float(text)
            number = -number if negative else number
            # The structured form's int_value is an int64; SQL may not say more.
            if isinstance(number, int) and not -(2**63) <= number < 2**63:
                raise self.fail(node, f"{text} does not fit in a 64-bit integer")
            return number
        if negative:
            raise self.fail(owner, f"cannot negate {node.sql()!r}")
        if isinstance(node, exp.Literal):
            return node.this
        if isinstance(node, exp.Boolean):
            return bool(node.this)
        if (
            isinstance(node, exp.Cast)
            and node.to.is_type(exp.DataType.Type.DATE)
            and isinstance(node.this, exp.Literal)
            and node.this.is_string
        ):
            try:
                dt.date.fromisoformat(node.this.this)
            except ValueError:
                raise self.fail(owner, f"{node.this.this!r} is not a YYYY-MM-DD date") from None
            # A date travels as its ISO string, exactly as the structured form sends it.
            return node.this.this
        located = any("start" in n.meta for n in node.walk() if isinstance(n, exp.Expression))
        raise self.fail(
            node if located else owner,
            f"a value must be a string, number, TRUE/FALSE or DATE '...', not {node.sql()!r}",
        )

    def quantile_value(self, node: exp.Expression | None, owner: exp.Expression) -> float:
        value = self.value(node, owner) if node is not None else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise self.fail(owner, "the quantile must be a number strictly between 0 and 1")
        return float(value)

    def aggregate(self, node: exp.Expression, table: str, unit_column: UnitColumn | None) -> ir.Aggregate:
        alias = ""
        if isinstance(node, exp.Alias):
            alias, node = node.alias, node.this
        F = ir.Function
        if isinstance(node, exp.Count):
            arg = node.this
            if isinstance(arg, exp.Star):
                return ir.Aggregate(F.COUNT, alias=alias)
            if isinstance(arg, exp.Distinct) and len(arg.expressions) == 1:
                name = self.column(arg.expressions[0], table, "COUNT(DISTINCT ...)")
                unit = unit_column(table) if unit_column is not None else None
                if unit is not None and name != unit:
                    raise self.fail(
                        arg, f"COUNT(DISTINCT ...) counts privacy units only: write COUNT(DISTINCT {unit})"
                    )
                return ir.Aggregate(F.COUNT_UNITS, alias=alias)
            raise self.fail(
                node, "write COUNT(*) for rows or COUNT(DISTINCT <privacy unit>) for units", keyword="COUNT"
            )
        simple = {exp.Sum: F.SUM, exp.Avg: F.MEAN}
        for kind, function in simple.items():
            if type(node) is kind:
                return ir.Aggregate(
                    function,
                    self.column(node.this, table, f"the argument of {node.key.upper()}"),
                    alias=alias,
                )
        if isinstance(node, exp.Median):
            return ir.Aggregate(
                F.QUANTILE, self.column(node.this, table, "the argument of MEDIAN"), 0.5, alias
            )
        if isinstance(node, (exp.Quantile, exp.ApproxQuantile)):
            column = self.column(node.this, table, "the first argument of QUANTILE")
            return ir.Aggregate(
                F.QUANTILE, column, self.quantile_value(node.args.get("quantile"), node), alias
            )
        if isinstance(node, exp.WithinGroup) and isinstance(node.this, exp.PercentileCont):
            order = node.expression
            if (
                not isinstance(order, exp.Order)
                or len(order.expressions) != 1
                or order.expressions[0].args.get("desc")
            ):
                raise self.fail(
                    node, "PERCENTILE_CONT needs WITHIN GROUP (ORDER BY <column>)", keyword="PERCENTILE_CONT"
                )
            column = self.column(order.expressions[0].this, table, "the ORDER BY of PERCENTILE_CONT")
            return ir.Aggregate(F.QUANTILE, column, self.quantile_value(node.this.this, node), alias)
        if isinstance(node, exp.AggFunc) or isinstance(node, exp.Anonymous):
            name = node.sql_name() if isinstance(node, exp.AggFunc) else node.name.upper()
            raise self.fail(
                node, f"{name} is not supported; use COUNT, SUM, AVG, MEDIAN or QUANTILE", keyword=name
            )
        raise self.fail(node, f"{node.sql()!r} is neither a GROUP BY column nor a supported aggregate")

    def predicates(self, node: exp.Expression, table: str) -> list[tuple[ir.Filter, exp.Expression]]:
        """The filters of a WHERE clause, each with the node it came from, in text order.

        Iterative: a long AND chain is a deep tree, and its depth is the consumer's choice.
        """
        out, stack = [], [node]
        while stack:
            node = stack.pop()
            if isinstance(node, exp.Paren):
                stack.append(node.this)
            elif isinstance(node, exp.And):
                stack += [node.expression, node.this]
            else:
                out.append((self.predicate(node, table), node))
        return out

    def predicate(self, node: exp.Expression, table: str) -> ir.Filter:
        if isinstance(node, exp.EQ):
            return ir.Equals(
                self.column(node.this, table, "the left side of ="), self.value(node.expression, node)
            )
        if isinstance(node, exp.In):
            if node.args.get("query") is not None:
                raise self.fail(node, "IN takes a list of values, not a subquery", keyword="IN")
            if not node.expressions:
                raise self.fail(node, "IN needs at least one value", keyword="IN")
            column = self.column(node.this, table, "the left side of IN")
            return ir.InSet(column, tuple(self.value(v, node) for v in node.expressions))
        if isinstance(node, exp.Between):
            column = self.column(node.this, table, "the left side of BETWEEN")
            return ir.Between(column, self.value(node.args["low"], node), self.value(node.args["high"], node))
        if isinstance(node, exp.GTE):
            return ir.Between(
                self.column(node.this, table, "the left side of >="), low=self.value(node.expression, node)
            )
        if isinstance(node, exp.LTE):
            return ir.Between(
                self.column(node.this, table, "the left side of <="), high=self.value(node.expression, node)
            )
        operator = {
            exp.Or: "OR",
            exp.Not: "NOT",
            exp.GT: ">",
            exp.LT: "<",
            exp.NEQ: "<>",
            exp.Like: "LIKE",
            exp.Is: "IS",
        }.get(type(node), node.key.upper())
        raise self.fail(
            node, f"only =, IN, BETWEEN, >= and <= filters are supported, not {operator}", keyword=operator
        )

    # --- the statement ------------------------------------------------------------

    def statement(self) -> exp.Select:
        try:
            statements = [s for s in sqlglot.parse(self.text) if s is not None]
        except ParseError as exc:
            error = exc.errors[0] if exc.errors else {}
            near = error.get("highlight") or ""
            line, column = error.get("line") or 1, error.get("col") or 1
            # sqlglot reports the column where the offending token ends.
            where = _Where(line, max(1, column - len(near) + 1))
            description = error.get("description") or "cannot parse the text"
            raise _fail(where, f"{description}" + (f" near {near!r}" if near else "")) from None
        if len(statements) != 1:
            raise _fail(_Where(1, 1), f"expected one SELECT statement, found {len(statements)}")
        (statement,) = statements
        if not isinstance(statement, exp.Select):
            raise self.fail(
                None,
                f"only SELECT is supported, not {statement.key.upper()}",
                keyword=self.tokens[0].text.upper() if self.tokens else None,
            )
        return statement

    def query(
        self, mode: ir.Mode, privacy: ir.Privacy | None, purpose: str, unit_column: UnitColumn | None
    ) -> ir.Query:
        select = self.statement()
        known = {"expressions", "from", "from_", "where", "group"}
        clauses = {
            "joins": "JOIN",
            "having": "HAVING",
            "order": "ORDER",
            "limit": "LIMIT",
            "offset": "OFFSET",
            "with": "WITH",
            "distinct": "DISTINCT",
            "qualify": "QUALIFY",
            "windows": "WINDOW",
        }
        for key, value in select.args.items():
            if key in known or value in (None, [], False):
                continue
            keyword = clauses.get(key, key.upper())
            raise self.fail(
                value if isinstance(value, exp.Expression) else None,
                f"{keyword} is not supported",
                keyword=keyword,
            )
        source = select.args.get("from") or select.args.get("from_")
        if source is None:
            raise self.fail(None, "FROM <dataset> is required", keyword="SELECT")
        table = source.this
        if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
            raise self.fail(source, "FROM must name one dataset", keyword="FROM")
        if table.args.get("db") or table.args.get("catalog"):
            raise self.fail(table, "FROM names a dataset id, without a schema")
        dataset = table.name
        names = {dataset, table.alias} - {""}

        def owned(column: exp.Column) -> bool:
            return not column.table or column.table in names

        for column in select.find_all(exp.Column):
            if not owned(column):
                raise self.fail(column, f"column {column.sql()!r} names a table other than {dataset!r}")
            column.set("table", None)  # qualifiers checked; the IR knows one dataset

        group_nodes = select.args["group"].expressions if select.args.get("group") else []
        group_by = [self.column(node, dataset, "a GROUP BY entry") for node in group_nodes]
        selected: list[str] = []
        aggregates: list[ir.Aggregate] = []
        aggregate_nodes: list[exp.Expression] = []
        for node in select.expressions:
            inner = node.this if isinstance(node, exp.Alias) else node
            if isinstance(inner, exp.Column):
                if isinstance(node, exp.Alias):
                    raise self.fail(node, "a GROUP BY column cannot be renamed")
                name = self.column(inner, dataset, "a selected column")
                if name not in group_by:
                    raise self.fail(inner, f"column {name!r} is selected but not in GROUP BY")
                if aggregates:
                    raise self.fail(inner, "GROUP BY columns come before the aggregates in SELECT")
                selected.append(name)
                continue
            if isinstance(inner, exp.Star):
                raise self.fail(None, "SELECT * would output rows; select aggregates", keyword="*")
            aggregates.append(self.aggregate(node, dataset, unit_column))
            aggregate_nodes.append(node)
        missing = [name for name in group_by if name not in selected]
        if missing:
            raise self.fail(
                group_nodes[group_by.index(missing[0])],
                f"GROUP BY column {missing[0]!r} must also be selected (results always show it)",
            )
        if not aggregates:
            raise self.fail(None, "select at least one aggregate", keyword="SELECT")
        where = select.args.get("where")
        pairs = self.predicates(where.this, dataset) if where is not None else []
        nodes: dict[str, list[exp.Expression]] = {
            "filters": [n for _, n in pairs],
            "aggregates": aggregate_nodes,
            "group_by": [n for n in select.expressions if isinstance(n, exp.Column)],
            "dataset": [table],
        }
        try:
            return ir.Query(
                dataset=dataset,
                aggregates=tuple(aggregates),
                filters=tuple(f for f, _ in pairs),
                group_by=tuple(selected),
                mode=mode,
                privacy=privacy,
                purpose=purpose,
            )
        except InvalidQuery as exc:
            raise self._reword(exc, nodes) from None

    def _reword(self, exc: InvalidQuery, nodes: dict[str, list[exp.Expression]]) -> InvalidQuery:
        """The IR's complaint in terms of the request the consumer sent: a field of the
        SqlQuery message, or the place in the text that the IR field came from."""
        violation = exc.field_violations[0] if exc.field_violations else FieldViolation("query", exc.message)
        outside_text = ("query.mode", "query.privacy", "query.purpose")
        if violation.field.startswith(outside_text):
            field = "sql." + violation.field.removeprefix("query.")
            return InvalidQuery(
                f"{field}: {violation.description}",
                rule=exc.rule,
                field_violations=(FieldViolation(field, violation.description),),
            )
        match = re.match(r"query\.(filters|aggregates|group_by|dataset)(?:\[(\d+)\])?", violation.field)
        node = None
        if match:
            candidates = nodes[match.group(1)]
            index = int(match.group(2) or 0)
            node = candidates[index] if index < len(candidates) else None
        description = violation.description
        if match and description.startswith(("is ", "must ", "needs ")):
            # The IR's descriptions follow its field name; give them a subject instead.
            subject = {
                "filters": "the filter's value",
                "aggregates": "the aggregate",
                "group_by": "the column name",
                "dataset": "the dataset name",
            }[match.group(1)]
            description = f"{subject} {description}"
        return _fail(self.where(node), description)


def parse(
    text: str,
    *,
    mode: ir.Mode,
    privacy: ir.Privacy | None = None,
    purpose: str = "",
    unit_column: UnitColumn | None = None,
) -> ir.Query:
    """One SQL SELECT as the IR query a structured request would make.

    `unit_column(dataset)` gives the privacy-unit column of a dataset the caller can
    see (None otherwise); with it, COUNT(DISTINCT c) is accepted only for that column.
    """
    if not isinstance(text, str) or not text.strip():
        raise _fail(_Where(1, 1), "the SQL text is empty")
    if len(text) > MAX_SQL_LENGTH:
        raise _fail(_Where(1, 1), f"the SQL text is longer than {MAX_SQL_LENGTH} characters")
    try:
        return _Parser(text).query(mode, privacy, purpose, unit_column)
    except RecursionError:
        # Deeply nested parentheses: refuse as the consumer's error, not a crash.
        raise _fail(_Where(1, 1), "the SQL text is nested too deeply") from None
