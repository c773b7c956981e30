"""Load rule files into a :class:`RuleSet`, or say exactly what is wrong and where.

Every problem is reported at once as ``file:line:column: key.path: reason``: YAML syntax,
unknown keys (with the accepted ones), wrong types, bad globs, inconsistent conditions,
templates that do not render with sample values, and rule names used twice.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError
from pydantic import BaseModel, ValidationError

from ingestd.errors import ConfigError, key_path
from ingestd.rules.glob import Glob, GlobError
from ingestd.rules.model import (
    RESERVED_SEVERITIES,
    Flapping,
    Level,
    Rule,
    RuleSet,
    template_context,
    template_environment,
)
from ingestd.rules.schema import LevelSpec, RuleSpec, SelectSpec
from ingestd.rules.yamlmarks import Loc, MarkedDocument, read_marked_yaml

__all__ = [
    "RULE_FILE_SUFFIXES",
    "RulesError",
    "check_command",
    "format_validation_errors",
    "load_rule_files",
    "load_rules",
    "rule_files",
]

RULE_FILE_SUFFIXES = (".yaml", ".yml")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_SEVERITY = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_CONDITIONS = ("above", "below", "outside", "rate")


class RulesError(ConfigError):
    """Rule files that cannot be loaded; ``problems`` lists each as ``file:line:col: ...``."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        head = f"invalid rules ({count} problem{'s' if count != 1 else ''}):"
        super().__init__(head + "".join(f"\n  {p}" for p in self.problems))


def rule_files(path: Path) -> list[Path]:
    """The rule files ``path`` names: itself, or the ``*.yaml``/``*.yml`` files directly in
    it (not in subdirectories, so ``rules/tests/`` is not loaded as rules), sorted."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in RULE_FILE_SUFFIXES and p.is_file())
    if path.exists():
        return [path]
    raise RulesError([f"{path}: no such file or directory"])


def load_rules(path: Path) -> RuleSet:
    """Every rule in a file or a directory of rule files; raise RulesError listing every
    problem. An empty directory is a valid, empty rule set."""
    return load_rule_files(rule_files(path))


def load_rule_files(paths: Sequence[Path]) -> RuleSet:
    """Every rule in these files (names unique across all of them)."""
    problems: list[tuple[str, int, int, str]] = []
    rules: list[Rule] = []
    first_seen: dict[str, str] = {}
    for path in paths:
        document = read_marked_yaml(path)
        for mark, reason in document.problems:
            problems.append((str(path), mark.line, mark.column, reason))
        if document.data is None and document.problems:
            continue
        file_rules, file_problems = _load_document(document)
        problems.extend(file_problems)
        for index, rule in file_rules:
            where = document.where(("rules", index, "name"))
            if rule.name in first_seen:
                mark = document.mark(("rules", index, "name"))
                problems.append(
                    (
                        str(path),
                        mark.line,
                        mark.column,
                        f"rules.{index}.name: duplicate rule name {rule.name!r} "
                        f"(first defined at {first_seen[rule.name]})",
                    )
                )
                continue
            first_seen[rule.name] = where
            rules.append(rule)
    if problems:
        problems.sort(key=lambda p: (p[0], p[1], p[2]))
        raise RulesError([f"{f}:{line}:{col}: {reason}" for f, line, col, reason in problems])
    return RuleSet(tuple(rules), tuple(paths))


def check_command(paths: Sequence[Path]) -> tuple[int, str]:
    """``ingestd rules check [PATH...]``: exit code (0 valid, 2 invalid) and the text to
    print. Connects to nothing."""
    if not paths:
        return 2, "ingestd rules check: no rule file or directory given"
    lines: list[str] = []
    failed = False
    for path in paths:
        try:
            ruleset = load_rules(path)
        except RulesError as exc:
            failed = True
            lines.append(f"{path}: {exc}")
            continue
        files = len(ruleset.files)
        lines.append(
            f"{path}: {len(ruleset)} rule{'s' if len(ruleset) != 1 else ''} in "
            f"{files} file{'s' if files != 1 else ''}: valid"
        )
    return (2 if failed else 0), "\n".join(lines)


# --- one file -----------------------------------------------------------------------------

Problem = tuple[str, int, int, str]


class _Collector:
    """Problems of one document, each placed at the key or value it is about."""

    def __init__(self, document: MarkedDocument) -> None:
        self.document = document
        self.problems: list[Problem] = []

    def add(self, loc: Loc, reason: str, *, key: bool = False) -> None:
        mark = self.document.mark(loc, key=key)
        path = key_path(loc)
        self.problems.append((str(self.document.path), mark.line, mark.column, f"{path}: {reason}"))


def _load_document(document: MarkedDocument) -> tuple[list[tuple[int, Rule]], list[Problem]]:
    out = _Collector(document)
    data = document.data
    if data is None:
        return [], out.problems  # an empty file: no rules
    if not isinstance(data, dict):
        out.add((), "a rule file is a mapping with a `rules:` list")
        return [], out.problems
    for key in data:
        if key != "rules":
            out.add((key,), _unknown_key(key, ["rules"]), key=True)
    items = data.get("rules", [])
    if items is None:
        items = []
    if not isinstance(items, list):
        out.add(("rules",), "expected a list of rules (- name: ...)")
        return [], out.problems
    compiled: list[tuple[int, Rule]] = []
    for index, item in enumerate(items):
        loc: Loc = ("rules", index)
        try:
            spec = RuleSpec.model_validate(item)
        except ValidationError as exc:
            flagged = set()
            for prefix, reason, key in format_validation_errors(exc, RuleSpec):
                out.add((*loc, *prefix), reason, key=key)
                flagged.add(tuple(prefix))
            _check_raw(item, loc, flagged, out)
            continue
        rule = _compile(spec, loc, out)
        if rule is not None:
            compiled.append((index, rule))
    return compiled, out.problems


def _check_raw(item: Any, loc: Loc, flagged: set[Loc], out: _Collector) -> None:
    """Globs and templates of a rule that failed type validation, so one run reports them
    too (the checks that need a valid rule wait for the next run)."""
    if not isinstance(item, dict):
        return
    select = item.get("select")
    if isinstance(select, dict):
        patterns: list[tuple[Loc, Any]] = [((k,), v) for k, v in select.items() if k != "tags"]
        tags = select.get("tags")
        if isinstance(tags, dict):
            patterns += [(("tags", k), v) for k, v in tags.items()]
        for sub, pattern in patterns:
            if not isinstance(pattern, str) or ("select", *sub) in flagged:
                continue
            try:
                Glob(pattern)
            except GlobError as exc:
                out.add((*loc, "select", *sub), f"bad glob {pattern!r}: {exc}")
    annotations = item.get("annotations")
    if isinstance(annotations, dict) and ("annotations",) not in flagged:
        name = item.get("name") if isinstance(item.get("name"), str) else "rule"
        spec = RuleSpec.model_construct(
            name=name,
            select=SelectSpec.model_construct(measurement="*", field=None, tags={}),
            labels={},
            annotations={k: v for k, v in annotations.items() if isinstance(v, str)},
        )
        _compile_templates(spec, ["warning"], loc, out)


# --- pydantic errors ----------------------------------------------------------------------


def format_validation_errors(
    exc: ValidationError, model: type[BaseModel]
) -> list[tuple[Loc, str, bool]]:
    """Each error as (location, reason, whether it is about the key rather than the value)."""
    result = []
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            accepted = _accepted_keys(model, loc[:-1])
            result.append((loc, _unknown_key(str(loc[-1]), accepted), True))
        elif kind == "missing":
            result.append((loc, f"missing required key {loc[-1]!r}", False))
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            bad = error.get("input")
            shown = (
                "a mapping"
                if isinstance(bad, dict)
                else "a list"
                if isinstance(bad, list)
                else repr(bad)
            )
            if len(shown) > 60:
                shown = shown[:57] + "..."
            result.append((loc, f"{message} (got {shown})", False))
    return result


def _unknown_key(key: str, accepted: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (accepted: {', '.join(accepted)})"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_in(typing.get_args(annotation)[0])
    if origin in (list, tuple, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _accepted_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        fields = {f.alias or name: f for name, f in current.model_fields.items()}
        info = fields.get(part)
        current = _model_in(info.annotation) if info is not None else None
    if current is None:
        return []
    return [f.alias or name for name, f in current.model_fields.items()]


# --- semantic checks and compilation -------------------------------------------------------


def _compile(spec: RuleSpec, loc: Loc, out: _Collector) -> Rule | None:
    before = len(out.problems)
    if not _NAME.match(spec.name):
        out.add(
            (*loc, "name"),
            f"{spec.name!r} is not a rule name: letters, digits, _ . : - (at most 128), "
            "starting with a letter or digit",
        )
    globs = _compile_globs(spec, loc, out)
    levels: list[Level] = []
    has_condition = any(getattr(spec, c) is not None for c in _CONDITIONS)
    forms = [
        name
        for name, present in (
            ("a condition (above, below, outside or rate)", has_condition),
            ("levels", spec.levels is not None),
            ("deadman", spec.deadman is not None),
        )
        if present
    ]
    if len(forms) != 1:
        found = " and ".join(forms) if forms else "none"
        out.add(
            loc,
            "a rule needs exactly one of: a condition (above, below, outside or rate), "
            f"levels, or deadman; found {found}",
        )
    elif spec.deadman is not None:
        _check_deadman(spec, loc, out)
        levels.append(_deadman_level(spec))
    elif spec.levels is not None:
        if spec.severity is not None:
            out.add((*loc, "severity"), "with levels, each level has its own severity")
        if spec.clear is not None:
            out.add((*loc, "clear"), "with levels, each level has its own clear condition")
        if not spec.levels:
            out.add((*loc, "levels"), "at least one level is needed")
        for index, level_spec in enumerate(spec.levels):
            level = _compile_level(level_spec, spec.for_, (*loc, "levels", index), out)
            if level is not None:
                levels.append(level)
        seen: set[str] = set()
        for index, level in enumerate(levels):
            if level.severity in seen:
                out.add(
                    (*loc, "levels", index, "severity"),
                    f"severity {level.severity!r} used twice in one rule",
                )
            seen.add(level.severity)
    else:
        level_spec = LevelSpec.model_validate(
            {
                **spec.model_dump(
                    by_alias=True,
                    include={"above", "below", "outside", "rate", "clear", "for_"},
                    exclude_none=True,
                ),
                "severity": spec.severity or "warning",
            }
        )
        level = _compile_level(level_spec, None, loc, out)
        if level is not None:
            levels.append(level)
    if spec.deadman is None:
        for key in ("per", "grace", "forget"):
            if getattr(spec, key) is not None:
                out.add((*loc, key), "only deadman rules have this key")
        if spec.select.field is None:
            out.add(
                (*loc, "select"),
                "a condition rule must name the field(s) it tests: select.field",
            )
    if spec.repeat_interval is not None and spec.repeat_interval <= 0:
        out.add((*loc, "repeat_interval"), "must be more than 0 (leave it out to never repeat)")
    flapping = spec.flapping
    if flapping.max_changes and (flapping.window <= 0 or flapping.stable <= 0):
        out.add((*loc, "flapping"), "window and stable must be more than 0")
    for key in spec.labels:
        if not _LABEL.match(key):
            out.add(
                (*loc, "labels", key),
                f"{key!r} is not a label name: letters, digits and _, not starting with a digit",
                key=True,
            )
    severities = [lvl.severity for lvl in levels] or ["warning"]
    templates = _compile_templates(spec, severities, loc, out)
    if len(out.problems) > before or globs is None:
        return None
    measurement, field_glob, device, site, tags = globs
    return Rule(
        name=spec.name,
        source=out.document.where(loc),
        measurement=measurement,
        field=field_glob,
        device=device,
        site=site,
        tags=tags,
        levels=tuple(levels),
        deadman=spec.deadman,
        per=spec.per or "field",
        grace=spec.grace if spec.grace is not None else (spec.deadman or 0.0),
        forget=spec.forget,
        labels=dict(spec.labels),
        annotations=templates,
        annotation_sources=dict(spec.annotations),
        repeat_interval=spec.repeat_interval,
        flapping=Flapping(flapping.max_changes, flapping.window, flapping.stable),
    )


GlobSet = tuple[Glob, Glob, Glob, Glob, tuple[tuple[str, Glob], ...]]


def _compile_globs(spec: RuleSpec, loc: Loc, out: _Collector) -> GlobSet | None:
    select = spec.select
    field_pattern = select.field if select.field is not None else "*"
    compiled: dict[str, Glob] = {}
    ok = True
    for key, pattern in (
        ("measurement", select.measurement),
        ("field", field_pattern),
        ("device", select.device),
        ("site", select.site),
    ):
        try:
            compiled[key] = Glob(pattern)
        except GlobError as exc:
            out.add((*loc, "select", key), f"bad glob {pattern!r}: {exc}")
            ok = False
    tags: list[tuple[str, Glob]] = []
    for key, pattern in select.tags.items():
        if key in {"device", "site"}:
            out.add(
                (*loc, "select", "tags", key),
                f"use select.{key}, not select.tags.{key}",
                key=True,
            )
            ok = False
            continue
        try:
            tags.append((key, Glob(pattern)))
        except GlobError as exc:
            out.add((*loc, "select", "tags", key), f"bad glob {pattern!r}: {exc}")
            ok = False
    if not ok:
        return None
    return (
        compiled["measurement"],
        compiled["field"],
        compiled["device"],
        compiled["site"],
        tuple(sorted(tags)),
    )


def _check_severity(severity: str, loc: Loc, out: _Collector) -> None:
    if not _SEVERITY.match(severity):
        out.add(
            (*loc, "severity"),
            f"{severity!r} is not a severity: lower-case letters, digits, _ and -, "
            "starting with a letter (e.g. warning, critical)",
        )
    elif severity in RESERVED_SEVERITIES:
        out.add(
            (*loc, "severity"),
            f"{severity!r} is reserved (alerts/{severity}/... has another meaning); "
            f"not one of {', '.join(sorted(RESERVED_SEVERITIES))}",
        )


def _check_deadman(spec: RuleSpec, loc: Loc, out: _Collector) -> None:
    assert spec.deadman is not None
    if spec.deadman <= 0:
        out.add((*loc, "deadman"), "must be more than 0")
    for key in ("clear", "for_"):
        if getattr(spec, key) is not None:
            out.add(
                (*loc, "for" if key == "for_" else key),
                "a deadman rule fires after `deadman` without readings; it has no "
                f"{'for' if key == 'for_' else key}",
            )
    if spec.forget is not None and spec.forget <= spec.deadman:
        out.add((*loc, "forget"), f"must be longer than deadman ({spec.deadman:g}s)")
    _check_severity(spec.severity or "warning", loc, out)


def _deadman_level(spec: RuleSpec) -> Level:
    after = spec.deadman or 0.0
    return Level(
        severity=spec.severity or "warning",
        kind="deadman",
        threshold=after,
        clear=None,
        for_=0.0,
        window=None,
        trigger=lambda silence: silence >= after,
        cleared=lambda silence: silence < after,
    )


def _compile_level(
    spec: LevelSpec, default_for: float | None, loc: Loc, out: _Collector
) -> Level | None:
    before = len(out.problems)
    _check_severity(spec.severity, loc, out)
    present = [c for c in _CONDITIONS if getattr(spec, c) is not None]
    if len(present) != 1:
        found = ", ".join(present) if present else "none"
        out.add(loc, f"a level needs exactly one of above, below, outside, rate; found {found}")
        return None
    kind = present[0]
    window: float | None = None
    clear = spec.clear
    clear_keys = [
        k for k in ("above", "below", "inside") if clear and getattr(clear, k) is not None
    ]
    if clear is not None and len(clear_keys) != 1:
        out.add((*loc, "clear"), "a clear condition has exactly one of above, below, inside")
        return None
    clear_key = clear_keys[0] if clear_keys else None
    trigger: Callable[[float], bool]
    cleared: Callable[[float], bool]
    threshold: float | tuple[float, float]
    clear_value: float | tuple[float, float] | None = None
    direction: str = kind
    if kind == "rate":
        rate = spec.rate
        assert rate is not None
        window = rate.window
        if window <= 0:
            out.add((*loc, "rate", "window"), "must be more than 0")
        sides = [s for s in ("above", "below") if getattr(rate, s) is not None]
        if len(sides) != 1:
            out.add((*loc, "rate"), "a rate condition has exactly one of above, below")
            return None
        direction = sides[0]
        value = getattr(rate, direction)
        loc_value: Loc = (*loc, "rate", direction)
    elif kind == "outside":
        assert spec.outside is not None
        value = spec.outside
        loc_value = (*loc, "outside")
    else:
        value = getattr(spec, kind)
        loc_value = (*loc, kind)
    if not _finite(value):
        out.add(loc_value, "must be a finite number")
        return None
    expected_clear = {"above": "below", "below": "above", "outside": "inside"}[direction]
    if clear_key is not None and clear_key != expected_clear:
        out.add(
            (*loc, "clear", clear_key),
            f"a level that fires {direction} its threshold clears {expected_clear} "
            f"one (clear: {{{expected_clear}: ...}})",
            key=True,
        )
        return None
    if direction == "above":
        t = float(value)
        threshold = t
        if clear is not None and clear.below is not None:
            c = clear.below
            clear_value = c
            if not (_finite(c) and c <= t):
                out.add((*loc, "clear", "below"), f"must be at most the threshold {t:g}")
            trigger, cleared = (lambda v: v > t), (lambda v: v < c)
        else:
            trigger, cleared = (lambda v: v > t), (lambda v: v <= t)
    elif direction == "below":
        t = float(value)
        threshold = t
        if clear is not None and clear.above is not None:
            c = clear.above
            clear_value = c
            if not (_finite(c) and c >= t):
                out.add((*loc, "clear", "above"), f"must be at least the threshold {t:g}")
            trigger, cleared = (lambda v: v < t), (lambda v: v > c)
        else:
            trigger, cleared = (lambda v: v < t), (lambda v: v >= t)
    else:
        lo, hi = float(value[0]), float(value[1])
        threshold = (lo, hi)
        if lo >= hi:
            out.add(
                (*loc, "outside"), f"expected [low, high] with low < high, got [{lo:g}, {hi:g}]"
            )
        if clear is not None and clear.inside is not None:
            a, b = clear.inside
            clear_value = (a, b)
            if not (_finite((a, b)) and lo <= a <= b <= hi):
                out.add(
                    (*loc, "clear", "inside"),
                    f"expected [low, high] within [{lo:g}, {hi:g}] with low <= high",
                )
            trigger = lambda v: v < lo or v > hi  # noqa: E731
            cleared = lambda v: a <= v <= b  # noqa: E731
        else:
            trigger = lambda v: v < lo or v > hi  # noqa: E731
            cleared = lambda v: lo <= v <= hi  # noqa: E731
    for_ = spec.for_ if spec.for_ is not None else (default_for or 0.0)
    if len(out.problems) > before:
        return None
    return Level(
        severity=spec.severity,
        kind=kind,  # type: ignore[arg-type]
        threshold=threshold,
        clear=clear_value,
        for_=for_,
        window=window,
        trigger=trigger,
        cleared=cleared,
    )


def _finite(value: Any) -> bool:
    if isinstance(value, tuple | list):
        return all(math.isfinite(v) for v in value)
    return isinstance(value, int | float) and math.isfinite(value)


def _compile_templates(
    spec: RuleSpec, severities: Sequence[str], loc: Loc, out: _Collector
) -> dict[str, Template]:
    environment = template_environment()
    templates: dict[str, Template] = {}
    sample_tags = {key: f"sample-{key}" for key in spec.select.tags}
    sample_tags["site"] = "greenhouse-1"
    for key, source in spec.annotations.items():
        where: Loc = (*loc, "annotations", key)
        try:
            template = environment.from_string(source)
        except TemplateError as exc:
            out.add(where, f"template error: {_template_problem(exc)}")
            continue
        for severity in severities:
            context = template_context(
                rule=spec.name,
                device="esp32-sample",
                site="greenhouse-1",
                field=spec.select.field or "value",
                measurement=spec.select.measurement,
                severity=severity,
                state="firing",
                kind="firing",
                value=7.25,
                threshold=7.0,
                last=7.25,
                started_at=1_700_000_000.0,
                last_seen=1_700_000_000.0,
                at=1_700_000_060.0,
                tags=sample_tags,
                labels=dict(spec.labels),
            )
            try:
                template.render(context)
            except (TemplateError, ArithmeticError, TypeError, ValueError) as exc:
                out.add(
                    where,
                    f"template error with sample values: {_template_problem(exc)} "
                    "(available: " + ", ".join(sorted(context)) + "; "
                    "tags other than those in select may be missing: use tags.get('x', ''))",
                )
                break
        else:
            templates[key] = template
    return templates


def _template_problem(exc: BaseException) -> str:
    line = getattr(exc, "lineno", None)
    message = getattr(exc, "message", None) or str(exc)
    return f"{message} (template line {line})" if line and line > 1 else str(message)
