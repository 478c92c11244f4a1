"""Where the browser tool's results and pages come from: a folder of documents, or a web search API.

A backend is any object with `search(query, topn) -> list[SearchResult]` and `fetch(url) -> Page`; a fetch of
`view-source:{url}` asks for the document's source. The tool turns whatever a backend raises into a message for
the model.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import bm25s
import Stemmer

from gptoss_jax.tools.browser_pages import (
    VIEW_SOURCE,
    Page,
    SearchResult,
    html_page,
    markdown_page,
    shortened,
    strip_links,
    text_page,
)

SNIPPET_CHARS = 200  # a local search result's snippet


class Backend(Protocol):
    def search(self, query: str, topn: int) -> list[SearchResult]:
        """The best results for `query`, at most `topn` (none when nothing matches)."""

    def fetch(self, url: str) -> Page:
        """The page at `url`; a url that starts with VIEW_SOURCE asks for the document's source as plain text."""


class LocalBackend:
    """Searches and opens the documents under one folder: .txt, .md/.markdown and .html/.htm files (not hidden
    ones), read as UTF-8. A document's URL is `file:///abs/path`; `open` also takes a path relative to the
    folder, and links between the documents (relative or file://) open like web links. Nothing outside the folder
    is opened, whatever the URL.

    Search is BM25 over each document's title and text, with English stop words and Snowball stemming (so
    "planets" finds "planet"), by bm25s: maintained, numpy-only and fast (2,000 documents of 2 KB are read and
    indexed in about a second, a search takes milliseconds). tantivy is a whole search engine (a Rust build, an
    index on disk) that one folder does not need; whoosh and rank_bm25 are no longer maintained. The folder is
    indexed once, when the backend is made; `open` reads a document anew each time.
    """

    SUFFIXES = {".txt": text_page, ".md": markdown_page, ".markdown": markdown_page, ".html": html_page,
                ".htm": html_page}

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise NotADirectoryError(f"browser documents: {folder} is not a folder")
        paths = sorted(path for path in self.folder.rglob("*") if self._is_document(path))
        if not paths:
            raise FileNotFoundError(f"browser documents: no {', '.join(self.SUFFIXES)} files under {folder}")
        self._stemmer = Stemmer.Stemmer("english")
        self._pages = [self.fetch(path.as_uri()) for path in paths]
        self._index = bm25s.BM25()
        self._index.index(self._terms([page.title + "\n" + strip_links(page.text) for page in self._pages]),
                          show_progress=False)

    def search(self, query: str, topn: int) -> list[SearchResult]:
        terms = self._terms([query])
        if not terms[0]:
            return []
        ids, scores = self._index.retrieve(terms, k=min(topn, len(self._pages)), show_progress=False)
        hits = [self._pages[index] for index, score in zip(ids[0], scores[0], strict=True) if score > 0]
        return [SearchResult(page.title, page.url, self._snippet(page, terms[0])) for page in hits]

    def fetch(self, url: str) -> Page:
        view_source = url.startswith(VIEW_SOURCE)
        path = self._path(url.removeprefix(VIEW_SOURCE))
        content = path.read_text(encoding="utf-8", errors="replace")
        if view_source:
            return text_page(content, VIEW_SOURCE + path.as_uri(), path.name)
        return self.SUFFIXES[path.suffix.lower()](content, path.as_uri())

    def _is_document(self, path: Path) -> bool:
        """A file with one of the SUFFIXES inside the folder (links followed), not hidden."""
        path = path.resolve()
        return (path.is_relative_to(self.folder) and path.is_file() and path.suffix.lower() in self.SUFFIXES
                and not any(part.startswith(".") for part in path.relative_to(self.folder).parts))

    def _path(self, url: str) -> Path:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("", "file"):
            raise LookupError(f"this browser opens only the documents under {self.folder}")
        path = (self.folder / urllib.parse.unquote(parts.path)).resolve()  # an absolute path replaces the folder
        if not self._is_document(path):
            raise LookupError(f"no document {urllib.parse.unquote(parts.path)} under {self.folder}")
        return path

    def _terms(self, texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(texts, stopwords="en", stemmer=self._stemmer, return_ids=False, show_progress=False)

    def _snippet(self, page: Page, terms: list[str]) -> str:
        """The line of the document that holds the most query terms (their stems, as substrings), cut short; not
        the URL or title lines, which the result shows already."""
        shown = {"", f"URL: {page.url}", page.title}
        lines = [line for line in strip_links(page.text).split("\n") if line.strip("# ") not in shown]
        best = max(lines, key=lambda line: sum(term in line.lower() for term in terms), default="")
        return shortened(best.strip(), SNIPPET_CHARS)


def _api_key(given: str | None, variable: str, backend: str) -> str:
    key = given or os.environ.get(variable)
    if not key:
        raise ValueError(f"{backend} needs an API key: set the {variable} environment variable or pass api_key=")
    return key


def _request(url: str, headers: dict[str, str], payload: dict | None = None, query: dict | None = None) -> Any:
    """One JSON request: a POST when there is a payload, else a GET (with `query` as its parameters)."""
    if query:
        url += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(
        url, data=None if payload is None else json.dumps(payload).encode(),
        headers={**headers, "content-type": "application/json", "user-agent": "gptoss-jax"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


class ExaBackend:
    """Exa's search API (exa.ai) as the reference tool calls it: /search for results with a summary each, /contents
    for a page's HTML. The key comes from `api_key` or EXA_API_KEY. A view-source open shows the same page."""

    URL = "https://api.exa.ai"

    def __init__(self, api_key: str | None = None):
        self._headers = {"x-api-key": _api_key(api_key, "EXA_API_KEY", "ExaBackend")}

    def search(self, query: str, topn: int) -> list[SearchResult]:
        data = _request(f"{self.URL}/search", self._headers,
                        {"query": query, "numResults": topn, "contents": {"summary": True}})
        return [SearchResult(result.get("title") or "", result["url"], result.get("summary") or "")
                for result in data["results"]]

    def fetch(self, url: str) -> Page:
        url = url.removeprefix(VIEW_SOURCE)
        data = _request(f"{self.URL}/contents", self._headers, {"urls": [url], "text": {"includeHtmlTags": True}})
        if not data.get("results"):
            raise LookupError(f"Exa returned no contents for {url}")
        return html_page(data["results"][0].get("text") or "", url, data["results"][0].get("title"))


def _joined(snippets: str | list[str]) -> str:
    return " ".join(snippets) if isinstance(snippets, list) else snippets


class YouComBackend:
    """You.com's search API (you.com/platform) as the reference tool calls it: /v1/search for web and news results,
    /v1/contents for a page's HTML. The key comes from `api_key` or YDC_API_KEY. A view-source open shows the same
    page."""

    URL = "https://api.ydc-index.io"

    def __init__(self, api_key: str | None = None):
        self._headers = {"x-api-key": _api_key(api_key, "YDC_API_KEY", "YouComBackend")}

    def search(self, query: str, topn: int) -> list[SearchResult]:
        data = _request(f"{self.URL}/v1/search", self._headers, query={"query": query, "count": topn})["results"]
        web = [SearchResult(result.get("title") or "", result["url"], _joined(result.get("snippets") or ""))
               for result in data.get("web", [])]
        news = [SearchResult(result.get("title") or "", result["url"], result.get("description") or "")
                for result in data.get("news", [])]
        return (web + news)[:topn]

    def fetch(self, url: str) -> Page:
        url = url.removeprefix(VIEW_SOURCE)
        data = _request(f"{self.URL}/v1/contents", self._headers, {"urls": [url], "livecrawl_formats": "html"})
        if not data or "html" not in data[0]:
            raise LookupError(f"You.com returned no HTML for {url}")
        return html_page(data[0]["html"], url, data[0].get("title"))
