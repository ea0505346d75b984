"""Every billing rule of docs/domain.md is cited by at least one test outside this file."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
DOMAIN = TESTS.parent / "docs" / "domain.md"
RULE = re.compile(r"^- ((?:AC|SG|CR|MK)-\d+) ", flags=re.M)


def rule_ids() -> list[str]:
    return RULE.findall(DOMAIN.read_text())


def test_domain_md_lists_the_four_models_rules() -> None:
    ids = rule_ids()
    assert len(ids) == len(set(ids))
    assert {i.split("-")[0] for i in ids} == {"AC", "SG", "CR", "MK"}
    assert len(ids) == 10 + 11 + 8 + 6


def test_every_rule_is_cited_by_a_test() -> None:
    sources = "\n".join(p.read_text() for p in sorted(TESTS.rglob("test_*.py")) if p != Path(__file__).resolve())
    uncited = [i for i in rule_ids() if not re.search(rf"\b{re.escape(i)}(?!\d)", sources)]
    assert not uncited, f"rules no test cites: {', '.join(uncited)}"
