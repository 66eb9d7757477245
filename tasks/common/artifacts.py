"""Prefect artifacts from inside stages: no-ops outside a Prefect run, so pure tests and
``c2m`` subcommands that run a stage directly need no server. Everything published goes through
tasks/security.redact first: an exported token never reaches the Prefect database or UI."""
from __future__ import annotations

import logging
import re

log = logging.getLogger("corpus2model")


def _in_prefect_run() -> bool:
    import sys

    if "prefect" not in sys.modules:
        # No Prefect run can be active in a process that never imported prefect; importing it just to
        # ask costs ~1 s and ~100 MB per standalone command (c2m dedup) and in every forked worker.
        return False
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return False
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(text: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "artifact"


def publish_markdown(key: str, markdown: str, description: str = "") -> None:
    if _in_prefect_run():
        from prefect.artifacts import create_markdown_artifact

        from corpus2model.tasks.common.security import redact

        create_markdown_artifact(key=artifact_key(key), markdown=redact(markdown), description=redact(description))


def publish_table(key: str, rows: list[dict], description: str = "") -> None:
    if _in_prefect_run():
        from prefect.artifacts import create_table_artifact

        from corpus2model.tasks.common.security import redact, redact_obj

        create_table_artifact(key=artifact_key(key), table=redact_obj(rows), description=redact(description))


def publish_link(key: str, link: str, text: str = "", description: str = "") -> None:
    if _in_prefect_run():
        from prefect.artifacts import create_link_artifact

        from corpus2model.tasks.common.security import redact

        create_link_artifact(key=artifact_key(key), link=redact(link), link_text=redact(text or link), description=redact(description))


def publish_image(key: str, png_path: str, description: str = "") -> None:
    """A PNG as a markdown artifact (a file:// link: the Prefect UI has no image upload)."""
    publish_markdown(key, f"![{key}](file://{png_path})\n\n`{png_path}`", description)
