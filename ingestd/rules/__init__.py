"""Alert rules: load and validate YAML rule files, evaluate readings, test rules.

    load_rules(path) -> RuleSet            loader.py  (RulesError: file:line:col for each problem)
    Engine(ruleset, now)                    engine.py  evaluate / tick / acknowledge / reload /
                                                       snapshot / restore -> AlertEvent lists
    run_rule_tests(path) -> TestReport      testing.py (YAML rule tests, like promtool's)
    check_command / test_command            for ``ingestd rules check`` / ``rules test``

Nothing here does I/O beyond reading rule and test files: publishing events, persisting
snapshots, watching files and wiring commands belong to the daemon and the CLI.
"""

from __future__ import annotations

from ingestd.rules.engine import Engine, EngineStats, SnapshotError
from ingestd.rules.loader import RulesError, check_command, load_rule_files, load_rules
from ingestd.rules.model import Alert, AlertEvent, Rule, RuleSet, topic_level
from ingestd.rules.testing import TestReport, TestResult, run_rule_tests, test_command

__all__ = [
    "Alert",
    "AlertEvent",
    "Engine",
    "EngineStats",
    "Rule",
    "RuleSet",
    "RulesError",
    "SnapshotError",
    "TestReport",
    "TestResult",
    "check_command",
    "load_rule_files",
    "load_rules",
    "run_rule_tests",
    "test_command",
    "topic_level",
]
