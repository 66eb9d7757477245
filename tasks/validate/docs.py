"""Data Docs that read offline.

GE's Data Docs pull Bootstrap, jQuery, Font Awesome and vega from CDNs and fill the index table
with JavaScript, so offline they render as an empty, unstyled page. We strip every remote
stylesheet/script (and GE's tracking logo), inline our stylesheet (``templates/docs.css``), drop the
unused static assets (3.6 MB of GIFs and fonts per run) and write our own ``index.html``
(``templates/index.html``): the summary table with severities and reasons, linking GE's
validation-result and suite pages. The templates are package data, read with importlib.resources.
"""
from __future__ import annotations

import functools
import html
import re
from pathlib import Path
from string import Template

from corpus2model.tasks.common.resources import package_path, suites_dir
from corpus2model.tasks.validate.report import (BOUNDARY_TITLES, ValidationReport, first_ids, result_word, unexpected_text,
                                                where_text)
from corpus2model.tasks.validate.suite import overrides_field

# Long unexpected values (a 120k-character input) would otherwise be copied into the HTML verbatim.
_MAX_HTML_TEXT = 300

_REMOTE_LINK = re.compile(r"<link\b[^>]*>", re.I)
_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script\s*>", re.I | re.S)
_STYLE_TAG = re.compile(r"<style\b[^>]*>.*?</style\s*>", re.I | re.S)
_FOOTER = re.compile(r"<footer\b.*?</footer\s*>", re.I | re.S)
_REMOTE_IMG = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']https?://[^>]*>", re.I)
_LONG_TEXT = re.compile(r">([^<]{%d,})<" % (_MAX_HTML_TEXT + 1))
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")


@functools.lru_cache(maxsize=None)
def _template_text(name: str) -> str:
    return package_path("corpus2model.tasks.validate", "templates", name).read_text(encoding="utf-8")


def stylesheet() -> str:
    """The stylesheet every page gets inline (offline pages cannot fetch one)."""
    return _template_text("docs.css")


def _fill(name: str, **values) -> str:
    """A template with every ``${name}`` filled (a missing value is a KeyError, not a silent gap)."""
    return Template(_template_text(name)).substitute(values)


def _fragment(name: str, **values) -> str:
    """A section of the index: one line in its file, inserted without the file's final newline."""
    return _fill(name, **values).rstrip("\n")


def offline_html(page: str) -> str:
    """Make one GE Data Docs page self-contained: no CDN CSS/JS, no remote images, our stylesheet."""
    page = _SCRIPT.sub("", page)  # every script needs jQuery/Bootstrap from a CDN
    page = _REMOTE_LINK.sub("", page)  # CDN stylesheets and the favicon from static/
    page = _STYLE_TAG.sub("", page)  # GE's overrides assume Bootstrap; ours replaces them
    page = _FOOTER.sub("", page)  # newsletter and tutorial banners
    # GE's logo is fetched from S3 with the data context id in the query string.
    page = _REMOTE_IMG.sub('<span class="c2m-brand">Great Expectations Data Docs</span>', page)

    def _trim(m: re.Match) -> str:
        text = m.group(1)
        if not text.strip():
            return m.group(0)
        head = text[:_MAX_HTML_TEXT]
        amp = head.rfind("&")
        if amp >= 0 and ";" not in head[amp:]:
            head = head[:amp]  # do not cut an entity such as &amp; in half
        return f'>{head}<span class="c2m-truncated">… ({len(text)} characters, truncated)</span><'

    page = _LONG_TEXT.sub(_trim, page)
    # The failing values themselves may hold NUL, ESC, zero-width marks: show them, do not emit them.
    page = _INVISIBLE.sub(lambda m: f"[U+{ord(m.group(0)):04X}]", page)
    css = stylesheet()
    return re.sub(r"<head\b[^>]*>", lambda m: f"{m.group(0)}\n<style>{css}</style>", page, count=1, flags=re.I)


def publish_docs(site: Path, docs_dir: Path, report: ValidationReport) -> dict[str, str]:
    """Post-process GE's site into ``docs_dir`` and write our index; returns the GE pages' paths."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    pages: dict[str, str] = {}
    for src in sorted(site.rglob("*.html")):
        rel = src.relative_to(site)
        if rel.as_posix() == "index.html":
            continue  # GE's index is an empty JS table offline; ours below replaces it
        dst = docs_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(offline_html(src.read_text(encoding="utf-8")), encoding="utf-8")
        if rel.parts[0] == "validations":
            pages["validation"] = rel.as_posix()
        elif rel.parts[0] == "expectations":
            pages["suite"] = rel.as_posix()
    (docs_dir / "index.html").write_text(index_html(report, pages), encoding="utf-8")
    return pages


def index_html(report: ValidationReport, pages: dict[str, str]) -> str:
    """Our Data Docs front page: the summary table, links to GE's pages, ingest's rejects, statistics."""
    e = html.escape
    status = "passed" if report.success else "FAILED"
    rows = []
    for r in report.results:
        word = result_word(r)
        cls = "c2m-pass" if r.success else "c2m-fail"
        kwargs = ", ".join(f"{k}={_kwarg_text(v)}" for k, v in r.kwargs.items() if k != "column")
        sample = ", ".join(e(str(i)) for i in first_ids(r))
        where = where_text(r.failing_where)
        if where:
            sample += f"<br>first rows: {e(where)}"
        relaxed = (f"<br><span class=\"text-muted\">suite says {r.suite_severity}; set by "
                   f"{overrides_field(report.boundary)}</span>") if r.suite_severity else ""
        rows.append(
            f"<tr><td><code>{e(r.expectation)}</code><br><span class=\"text-muted\">{e(kwargs)}</span></td>"
            f"<td>{e(r.column or '(table)')}</td><td class=\"c2m-sev-{r.severity}\">{r.severity}{relaxed}</td>"
            f"<td class=\"{cls}\">{e(word)}</td><td>{e(unexpected_text(r))}</td>"
            f"<td>{e(r.why)}{('<br><span class=text-muted>first ids: ' + sample + '</span>') if sample else ''}</td></tr>"
        )
    links = []
    if "validation" in pages:
        links.append(f"<li><a href=\"{e(pages['validation'])}\">Great Expectations validation result</a> "
                     "(every expectation with observed values and sample unexpected values)</li>")
    if "suite" in pages:
        links.append(f"<li><a href=\"{e(pages['suite'])}\">Expectation suite</a> (as Great Expectations renders it)</li>")
    return _fill(
        "index.html",
        status=status,
        status_class="c2m-pass" if report.success else "c2m-fail",
        suite_name=e(Path(report.suite).name),
        css=stylesheet(),
        title=e(BOUNDARY_TITLES.get(report.boundary, report.boundary)),
        suite_path=e(_display_path(report.suite)),
        suite_sha256=report.suite_sha256[:16],
        rows=report.rows,
        noun="pairs" if report.kind == "preference_pairs" else "records",
        expectations=len(report.results),
        error_failed=report.error_failed,
        warn_failed=report.warn_failed,
        links="".join(links),
        result_rows="\n".join(rows),
        rejected=_rejected_html(report.upstream_rejected),
        statistics=_profile_html(report.profile),
    )


def _rejected_html(rejected: dict) -> str:
    if not rejected:
        return ""
    rows = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{v}</td></tr>"
                   for k, v in sorted(rejected.items(), key=lambda kv: -kv[1]))
    return _fragment("rejected.html", total=sum(rejected.values()), rows=rows)


def _kwarg_text(v) -> str:
    """A regex as written in the suite (repr would double every backslash), lists without quotes."""
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, list):
        return "[" + ", ".join(_kwarg_text(x) if not isinstance(x, str) else x for x in v) + "]"
    return str(v)


def _display_path(path: str) -> str:
    """Our shipped suites are shown as schemas/suites/<name>, suites under the working directory
    relative to it, others in full."""
    p = Path(path).resolve()
    for root, prefix in ((suites_dir().resolve(), "schemas/suites/"), (Path.cwd().resolve(), "")):
        try:
            return prefix + p.relative_to(root).as_posix()
        except ValueError:
            continue
    return str(path)


def _profile_html(prof: dict) -> str:
    """The statistics the next run's distribution checks compare against, as a person reads them."""
    if not prof:
        return ""
    e = html.escape
    q = prof.get("length_quantiles") or {}
    tt = prof.get("task_types") or {}
    n = max(prof.get("rows", 0), 1)
    mix = "".join(f"<tr><td>{e(k)}</td><td>{v}</td><td>{v / n:.1%}</td></tr>" for k, v in sorted(tt.items(), key=lambda kv: -kv[1]))
    hist = prof.get("length_hist") or {}
    peak = max(hist.values(), default=1)
    bars = "".join(
        f"<tr><td>{2 ** int(b) - 1}–{2 ** (int(b) + 1) - 2}</td><td>{c}</td>"
        f"<td><span class=\"c2m-bar\" style=\"width:{max(1, round(200 * c / peak))}px\"></span></td></tr>"
        for b, c in sorted(hist.items(), key=lambda kv: int(kv[0])))
    quant = ", ".join(f"{k} {v:.0f}" for k, v in q.items())
    mix_table = (f"<table><thead><tr><th>task_type</th><th>rows</th><th>share</th></tr></thead><tbody>{mix}</tbody></table>"
                 if mix else "")
    return _fragment("statistics.html", quantiles=e(quant), mix_table=mix_table, bars=bars)
