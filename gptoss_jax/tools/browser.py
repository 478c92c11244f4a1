"""The gpt-oss built-in `browser` tool: `browser.search`, `browser.open` and `browser.find` over a pluggable backend.

gpt-oss was trained to read the web through pages drawn in one text format, and it answers best when it sees that
format again. The format here is the one of OpenAI's reference tool (gpt-oss, `gpt_oss/tools/simple_browser`):

    [1] Solar system (file:///docs/solar.html)
    **viewing lines [0 - 4] of 4**

    L0:
    L1: URL: file:///docs/solar.html
    L2: # Solar system
    L3:
    L4: The Sun is a 【0†star】 at the centre; see 【1†Wikipedia†en.wikipedia.org】.

Every page the tool shows gets the next cursor (`[1]`); the lines are the page's text wrapped at 80 characters and
numbered from 0, so a citation `【{cursor}†L{start}-L{end}】` names the same lines however the page was scrolled;
the scrollbar counts to the last line's number. Links are written `【{id}†{text}】` (`†{domain}` added when the
link leaves the page's site), numbered per page, so `open(id=…, cursor=…)` follows a link of any earlier page.
A search shows its results as such a page (`# Search Results`, then `  * 【id†title】 snippet`), and `find` shows
its matches as one too (`# 【id†match at L{line}】` and four lines from there; opening the id shows that place).

Backends give results and pages (`browser_backends`: a folder of documents, Exa, You.com; `browser_pages` turns
HTML, Markdown and text into pages); the tool keeps one conversation's cursors and a cache of fetched pages.
"""

from __future__ import annotations

import inspect
import json
import urllib.parse
from typing import Any

from gptoss_jax.tokenizer import get_encoding
from gptoss_jax.tools.browser_backends import Backend
from gptoss_jax.tools.browser_pages import VIEW_SOURCE, Page, find_page, results_page, shortened

MAX_TOKEN_CHARS = 128  # no o200k token decodes to more bytes, so a view of N tokens lies in (N + 1) * 128 chars
OPEN_LINES_ABOVE = 4  # opening a `find` match starts the view this many lines above it
URL_CHARS = 1024  # a URL in a page header (or an error) is cut to this many characters


class BrowserError(Exception):
    """A call the tool cannot carry out (bad arguments, a missing link or cursor, a failed fetch); its message is
    what the model reads instead of a page."""


class BrowserTool:
    """One conversation's browser: the pages shown so far (one per cursor) and a cache of fetched ones.

    `call(function, arguments)` is what a host runs for a message to `browser.{function}`: it always returns text,
    a page or an error for the model. `search`, `open` and `find` are the same functions for Python callers; they
    raise BrowserError where `call` answers with its message.
    """

    def __init__(self, backend: Backend, *, view_tokens: int = 1024, max_search_results: int = 20):
        self.backend = backend
        self.view_tokens = view_tokens  # an `open` without num_lines shows about this many tokens of lines
        self.max_search_results = max_search_results
        self._cursors: list[Page] = []
        self._fetched: dict[str, Page] = {}

    def call(self, function: str, arguments: str | dict[str, Any]) -> str:
        name = function.removeprefix("browser.")
        method = {"search": self.search, "open": self.open, "find": self.find}.get(name)
        if method is None:
            return json.dumps({"error": f"Unknown function: {function}"})
        try:
            kwargs = json.loads(arguments or "{}") if isinstance(arguments, str) else arguments
            if not isinstance(kwargs, dict):
                raise TypeError(f"expected a JSON object, got {type(kwargs).__name__}")
            inspect.signature(method).bind(**kwargs)
        except (json.JSONDecodeError, TypeError) as error:
            return json.dumps({"error": f"Invalid function arguments for browser.{name}: {error}"})
        try:
            return method(**kwargs)
        except BrowserError as error:
            return str(error)

    def page(self, cursor: int = -1) -> Page:
        """The page shown at `cursor` (-1: the latest), e.g. to turn a citation's cursor into its URL."""
        cursor = _integer("cursor", cursor)
        if not self._cursors:
            raise BrowserError("No pages to access!")
        if cursor == -1:
            return self._cursors[-1]
        if not 0 <= cursor < len(self._cursors):
            raise BrowserError(f"Cursor `{cursor}` is out of range. "
                               f"Available cursor indices: [0 - {len(self._cursors) - 1}].")
        return self._cursors[cursor]

    def search(self, query: str, topn: int = 10, source: str | None = None) -> str:
        """Shows the backend's first `topn` results (at most max_search_results) as a new page. `source` is
        accepted for the model's sake; the tool has one backend."""
        if not isinstance(query, str):
            raise BrowserError(f"`query` should be a string, not `{query!r}`")
        topn = _integer("topn", topn)
        if topn < 1:
            raise BrowserError(f"`topn` should be at least 1, not `{topn}`")
        results = []
        if query.strip():
            try:
                results = self.backend.search(query, min(topn, self.max_search_results))
            except Exception as error:  # the backend's failure is news for the model, not a crash of the host
                raise BrowserError(f"Error during search for `{query}`: {shortened(str(error), URL_CHARS)}") from error
        self._cursors.append(results_page(query, results))
        return self._show(loc=0, num_lines=-1)

    def open(self, id: int | str = -1, cursor: int = -1, loc: int = -1, num_lines: int = -1,
             view_source: bool = False, source: str | None = None) -> str:
        """Opens link `id` of the page at `cursor`, or the URL `id` is (always fetched anew), or without an id
        scrolls that page to line `loc`; `num_lines` lines are shown (-1: about view_tokens tokens' worth)."""
        loc, num_lines = _integer("loc", loc), _integer("num_lines", num_lines)
        if not isinstance(view_source, bool):
            raise BrowserError(f"`view_source` should be true or false, not `{view_source!r}`")
        landing, page = None, None
        if isinstance(id, str):
            url = id
        else:
            link_id, current = _integer("id", id), self.page(cursor)
            if link_id >= 0:
                if link_id not in current.links:
                    raise BrowserError(f"Invalid link id `{link_id}`.")
                url, landing = current.links[link_id], current.landing_lines.get(link_id)
            else:
                url, page = current.url, None if view_source else current
        if page is None:
            page = self._fetch(VIEW_SOURCE + url if view_source else url, anew=isinstance(id, str))
        self._cursors.append(page)
        if loc < 0:
            loc = max(landing - OPEN_LINES_ABOVE, 0) if landing is not None else 0
        return self._show(loc, num_lines)

    def find(self, pattern: str, cursor: int = -1) -> str:
        """Shows the lines of the page at `cursor` that contain `pattern` (any case) as a new page."""
        if not isinstance(pattern, str) or not pattern:
            raise BrowserError(f"`pattern` should be a non-empty string, not `{pattern!r}`")
        page = self.page(cursor)
        if page.listing:
            raise BrowserError("Cannot run `find` on search results page or find results page")
        self._cursors.append(find_page(page, pattern.lower()))
        return self._show(loc=0, num_lines=-1)

    def _fetch(self, url: str, anew: bool) -> Page:
        if not anew and url in self._fetched:
            return self._fetched[url]
        try:
            page = self.backend.fetch(url)
        except Exception as error:  # as in search: the model reads why
            message = f"Error fetching URL `{shortened(url, URL_CHARS)}`: {shortened(str(error), URL_CHARS)}"
            raise BrowserError(message) from error
        self._fetched[url] = self._fetched[page.url] = page
        return page

    def _show(self, loc: int, num_lines: int) -> str:
        """The latest page from line `loc` with its header; a `loc` past the end takes the page off again."""
        page, cursor = self._cursors[-1], len(self._cursors) - 1
        lines = page.lines
        if loc >= len(lines):
            self._cursors.pop()
            raise BrowserError(f"Invalid location parameter: `{loc}`. Cannot exceed page maximum of {len(lines) - 1}.")
        end = min(loc + num_lines, len(lines)) if num_lines > 0 else self._view_end(lines, loc)
        header = page.title + (f" ({shortened(urllib.parse.unquote(page.url), URL_CHARS)})" if page.url else "")
        return (f"[{cursor}] {header}\n**viewing lines [{loc} - {end - 1}] of {len(lines) - 1}**\n\n"
                + _numbered(lines[loc:end], loc))

    def _view_end(self, lines: list[str], loc: int) -> int:
        """Where a view of about view_tokens tokens ends: the line holding the last of them is shown whole."""
        text = _numbered(lines[loc:], loc)[: (self.view_tokens + 1) * MAX_TOKEN_CHARS]
        encoding = get_encoding()
        tokens = encoding.encode(text, disallowed_special=())
        if len(tokens) <= self.view_tokens:
            return len(lines)
        shown = encoding.decode_bytes(tokens[: self.view_tokens]).count(b"\n") + 1
        return min(loc + shown, len(lines))


def _numbered(lines: list[str], first: int) -> str:
    return "\n".join(f"L{first + index}: {line}" for index, line in enumerate(lines))


def _integer(name: str, value: Any) -> int:
    """An integer argument; JSON numbers such as 3.0 count (the tool's schema says `number`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise BrowserError(f"`{name}` should be an integer, not `{value!r}`")
