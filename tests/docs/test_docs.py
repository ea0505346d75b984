"""Docs that tests keep honest: every setting is in docs/settings.md, every metric in
docs/monitoring.md, every quotactl command and the test command in the README; the
topologies page names files that exist and every table of the PostgreSQL schema."""

from __future__ import annotations

import re
import urllib.request
from dataclasses import fields
from pathlib import Path

import psycopg

from quota_sidecar.client.cli import COMMANDS
from quota_sidecar.server.ledger.postgres import PostgresLedger
from quota_sidecar.server.settings import Settings

from support.markdown import FENCED, anchors, slug
from support.postgres import SERVER, schema_for, schema_url
from support.sidecar import RunningSidecar

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SETTINGS = (ROOT / "docs" / "settings.md").read_text()
MONITORING = (ROOT / "docs" / "monitoring.md").read_text()


def test_every_setting_is_in_the_settings_table() -> None:
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        row = next((line for line in SETTINGS.splitlines() if line.startswith(f"| `{flag}`")), None)
        assert row is not None, f"{flag} is not in the settings table of docs/settings.md"
        assert f"`QUOTA_{f.name.upper()}`" in row


def test_every_quotactl_command_is_documented() -> None:
    for command in COMMANDS:
        assert f"`{command}`" in README, f"quotactl {command} is not in the README"


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```sh\n(.+?)\n```", README, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c).strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_every_exposed_metric_is_documented(sidecar_with_metrics: RunningSidecar) -> None:
    text = urllib.request.urlopen(sidecar_with_metrics.metrics_url, timeout=5).read().decode()
    names = {m for m in re.findall(r"^# TYPE (quota_\w+) ", text, flags=re.M) if not m.endswith("_created")}
    assert names, "the sidecar exposes no quota_ metrics"
    for name in names:
        documented = {name, f"{name}_total"}
        assert any(f"`{n}" in MONITORING for n in documented), f"metric {name} is not in docs/monitoring.md"


# -- links between the pages ---------------------------------------------------------------------

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(page: Path) -> list[str]:
    """The targets of a page's Markdown links outside code, except those to other sites."""
    prose = re.sub(r"`[^`\n]*`", "", FENCED.sub("", page.read_text()))
    targets = re.findall(r"\]\(([^)\s]+)\)", prose)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_headings_are_slugged_as_github_does() -> None:
    assert slug("Quick start (a fresh machine with Python 3.11+)") == "quick-start-a-fresh-machine-with-python-311"
    assert slug("Why `synchronous=FULL`") == "why-synchronousfull"
    assert slug("Model 1: contacts in the account (`contact-limit`)") == "model-1-contacts-in-the-account-contact-limit"
    assert slug("service QuotaService — the data plane") == "service-quotaservice--the-data-plane"


def test_every_relative_link_points_at_a_file_and_heading_that_exist() -> None:
    checked = 0
    for page in PAGES:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.relative_to(ROOT)} links to {target}: no such file"
            if anchor:
                assert linked.suffix == ".md", f"{page.relative_to(ROOT)} links to {target}: an anchor in a non-page"
                assert anchor in anchors(linked), f"{page.relative_to(ROOT)} links to {target}: no such heading"
            checked += 1
    assert checked >= 30, f"only {checked} links found: the link pattern no longer reads the pages"


def test_every_docs_page_is_linked_from_the_readme_or_the_docs_index() -> None:
    linked = {
        (page.parent / target.partition("#")[0]).resolve()
        for page in (ROOT / "README.md", ROOT / "docs" / "README.md")
        for target in relative_links(page)
        if target.partition("#")[0]
    }
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"docs/{page.name} is linked from nowhere"


TOPOLOGIES = (ROOT / "docs" / "topologies.md").read_text()


def test_the_topologies_page_names_only_files_that_exist() -> None:
    """Issue 16: every repository path docs/topologies.md names exists (its links are checked with every page's)."""
    named = re.findall(r"`((?:tests|deploy|server|docs|bench)/[\w./-]*\w)`", TOPOLOGIES)
    assert named
    for path in named:
        assert (ROOT / path).exists(), f"docs/topologies.md names {path}, which does not exist"


def test_the_citus_statements_name_every_table_of_the_postgresql_schema(postgres_server: None, tmp_path: Path) -> None:
    """Issue 16 (schema ready for Citus, by tenant): the tables docs/topologies.md distributes and those it
    replicates are, together, every table the sidecar creates, and each distributed one has tenant_id first in
    its primary key."""
    sql = TOPOLOGIES.split("```sql", 1)[1].split("```", 1)[0]
    distributed_part, reference_part = sql.split("create_reference_table", 1)
    distributed = set(re.findall(r"'(\w+)'", distributed_part)) - {"tenant_id", "citus"}
    reference = set(re.findall(r"'(\w+)'", reference_part))
    with schema_for(tmp_path) as schema:
        ledger = PostgresLedger(schema_url(schema))
        ledger.open()
        ledger.close()
        with psycopg.connect(SERVER) as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))}
            first_key = dict(
                conn.execute(
                    "SELECT c.relname, a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]"
                    " WHERE i.indisprimary AND n.nspname = %s",
                    (schema,),
                ).fetchall()
            )
    assert not distributed & reference
    assert distributed | reference == tables
    assert {t: first_key[t] for t in distributed} == {t: "tenant_id" for t in distributed}
