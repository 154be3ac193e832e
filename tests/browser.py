"""Render an HTML file in headless Chromium and inspect the DOM it ends with (after its scripts ran).

Chromium comes from the Debian packages `chromium` and `chromium-driver` (`make test` installs them). Without
it the report tests fail with a message saying so: the report's charts must be checked in a real browser.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=5000",
    "--dump-dom",
]


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    parent: Element | None = None
    children: list[Element] = field(default_factory=list)
    text: str = ""

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def find_all(self, tag: str | None = None, cls: str | None = None, id: str | None = None) -> list[Element]:
        found = []
        stack = list(reversed(self.children))
        while stack:
            e = stack.pop()
            if (
                (tag is None or e.tag == tag)
                and (cls is None or cls in e.classes)
                and (id is None or e.attrs.get("id") == id)
            ):
                found.append(e)
            stack.extend(reversed(e.children))
        return found

    def find(self, tag: str | None = None, cls: str | None = None, id: str | None = None) -> Element:
        found = self.find_all(tag, cls, id)
        assert found, f"no <{tag or '*'}> with class={cls} id={id} in the rendered DOM"
        return found[0]

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.cur = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        e = Element(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(e)
        if tag not in VOID:
            self.cur = e

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.cur.children.append(Element(tag, {k: v or "" for k, v in attrs}, self.cur))

    def handle_endtag(self, tag: str) -> None:
        e = self.cur
        while e is not self.root and e.tag != tag:  # tolerate implicitly closed elements
            e = e.parent
        if e is not self.root:
            self.cur = e.parent

    def handle_data(self, data: str) -> None:
        self.cur.text += data


def parse(dom: str) -> Element:
    b = _Builder()
    b.feed(dom)
    b.close()
    return b.root


@dataclass
class Rendered:
    dom: str
    root: Element
    console: list[str]  # console messages and uncaught errors Chromium logged


def render(path: str | Path) -> Rendered:
    """Load `path` in headless Chromium, let its scripts run, return the resulting DOM and console lines."""
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail(
            "headless Chromium is needed for the HTML report tests and is missing: install the Debian "
            "packages chromium and chromium-driver (make test does this)"
        )
    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    with tempfile.TemporaryDirectory(prefix="lowbit-chromium-") as profile:
        proc = subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", Path(path).resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}: {proc.stderr[-2000:]}"
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return Rendered(proc.stdout, parse(proc.stdout), console)


def external_references(root: Element) -> list[str]:
    """Attributes or inline text that point at http(s) URLs (a self-contained file has none)."""
    bad = []
    stack = [root]
    while stack:
        e = stack.pop()
        for k, v in e.attrs.items():
            if "http://" in v.lower() or "https://" in v.lower() or "//" == v[:2]:
                bad.append(f"<{e.tag} {k}={v!r}>")
        if e.tag in ("style", "script") and ("http://" in e.text or "https://" in e.text or "url(" in e.text):
            bad.append(f"<{e.tag}> mentions a URL")
        stack.extend(e.children)
    return bad
