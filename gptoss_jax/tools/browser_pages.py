"""Documents as the browser tool shows them: plain text whose links are marks `【id†text】`, wrapped into lines.

The text is what OpenAI's reference browser (gpt-oss, `gpt_oss/tools/simple_browser/page_contents.py`) makes of a
document, which is the format gpt-oss read while it learned to browse: HTML becomes Markdown-like text (`#`
headings, `  * ` list items, paragraphs apart), each link is numbered in its page and written `【id†text】`
(`【id†text†domain】` when it leaves the page's site), and a fetched page starts with a line `URL: {url}`. Search
results and `find` matches are pages of the same kind (`results_page`, `find_page`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import textwrap
import urllib.parse

import bs4

VIEW_SOURCE = "view-source:"  # an `open` with view_source=True asks the backend for this URL
LINE_WIDTH = 80  # pages are wrapped at this many characters before their lines are numbered
FIND_SHOWN_LINES = 4  # lines shown from each `find` match (and the lines skipped before looking for the next)
FIND_MAX_MATCHES = 50
LINK_SCHEMES = ("http", "https", "file")  # links to anything else (mailto:, javascript:, …) stay plain text

_LINK_MARK = re.compile(r"【\d+†([^†】]+)(?:†[^†】]+)?】")
_MARKDOWN_LINK = re.compile(r"(!?)\[([^\[\]\n]*)\]\(\s*<?([^\s()<>]+)>?(?:\s+[\"'][^\"'\n]*[\"'])?\s*\)")
# Brackets the page text must not contain (they would read as link marks), and invisible characters.
_RESERVED = str.maketrans({"【": "〖", "】": "〗", "◼": "◾", "\u200b": None, "\x00": None})
_KEPT_SPACE = "\x00"  # an indentation or <pre> space that whitespace merging must keep, made a space at the end


@dataclasses.dataclass(frozen=True)
class SearchResult:
    title: str
    url: str
    snippet: str


@dataclasses.dataclass(frozen=True)
class Page:
    """A page as the model reads it. `text` already holds its links as `【id†text】` marks; `links` maps each id to
    its URL. A `find` page also says where each of its ids lands (`landing_lines`: the line of the searched page)."""

    url: str
    title: str
    text: str
    links: dict[int, str] = dataclasses.field(default_factory=dict)
    landing_lines: dict[int, int] = dataclasses.field(default_factory=dict)
    listing: bool = False  # a search or find results page, which `find` does not search

    @functools.cached_property
    def lines(self) -> list[str]:
        """The numbered lines: the text wrapped at LINE_WIDTH, blank lines kept."""
        return [piece for line in self.text.split("\n")
                for piece in (textwrap.wrap(line, LINE_WIDTH, replace_whitespace=False, drop_whitespace=False)
                              or [""])]


def shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def merged(text: str) -> str:
    return " ".join(text.split())


def _clean(text: str) -> str:
    return text.translate(_RESERVED)


def strip_links(text: str) -> str:
    """The text with each link mark replaced by its text."""
    return _LINK_MARK.sub(r"\1", text)


def results_page(query: str, results: list[SearchResult]) -> Page:
    """Search results as the reference shows them: a page titled with the query and without a URL, which lists
    `  * 【id†title†domain】 snippet`."""
    if not results:
        return Page("", query, f"No search results for query: `{query}`", listing=True)
    marks, lines = LinkMarks(""), ["# Search Results", ""]
    for result in results:
        title, snippet = merged(_clean(result.title)), merged(_clean(result.snippet))
        lines.append(f"  * {marks.mark(result.url, title or result.url)} {snippet}".rstrip())
    return Page("", query, "\n".join(lines), marks.links, listing=True)


def find_page(page: Page, pattern: str) -> Page:
    """The lines of `page` that contain `pattern` (lower case) outside link marks, as the reference shows them:
    `# 【n†match at L{line}】` and the next lines, each match's id opening `page` near it."""
    lines = strip_links("\n".join(page.lines)).split("\n")
    chunks, landing_lines, index = [], {}, 0
    while index < len(lines) and len(chunks) < FIND_MAX_MATCHES:
        if pattern in lines[index].lower():
            shown = "\n".join(lines[index : index + FIND_SHOWN_LINES])
            chunks.append(f"# 【{len(chunks)}†match at L{index}】\n{shown}")
            landing_lines[len(landing_lines)] = index
            index += FIND_SHOWN_LINES
        else:
            index += 1
    text = "\n\n".join(chunks) or f"No `find` results for pattern: `{pattern}`"
    return Page(f"{page.url}/find?pattern={urllib.parse.quote(pattern)}",
                f"Find results for text: `{pattern}` in `{page.title}`", text,
                dict.fromkeys(landing_lines, page.url), landing_lines, listing=True)


class LinkMarks:
    """Numbers one page's links in their order (one id per URL) and writes each as a mark: `【id†text】`, with
    `†domain` added when the link leaves the page's site."""

    def __init__(self, page_url: str):
        self.page_domain = urllib.parse.urlsplit(page_url).netloc
        self._ids: dict[str, int] = {}

    @property
    def links(self) -> dict[int, str]:
        return {link_id: url for url, link_id in self._ids.items()}

    def mark(self, url: str, text: str) -> str:
        link_id = self._ids.setdefault(url, len(self._ids))
        domain = urllib.parse.urlsplit(url).netloc
        return f"【{link_id}†{text.replace('†', '‡')}{f'†{domain}' if domain != self.page_domain else ''}】"


def _link_target(page_url: str, href: str) -> str | None:
    """The absolute URL of a link, or None for one the model cannot open (within the page, mailto:, …)."""
    if href.startswith("#"):
        return None
    url = urllib.parse.urljoin(page_url, href)
    return url if urllib.parse.urlsplit(url).scheme in LINK_SCHEMES else None


def _default_title(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.unquote(parts.path.rstrip("/").rpartition("/")[2]) if parts.scheme == "file" else parts.netloc


def _page(url: str, title: str, body: str, links: dict[int, str]) -> Page:
    """A fetched page: its URL on the first lines (as the reference shows it), blank runs merged to one."""
    lines = [line.rstrip() for line in body.split("\n")]
    body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return Page(url, title, f"\nURL: {url}\n{body}", links)


def text_page(text: str, url: str, title: str | None = None) -> Page:
    return _page(url, title or _default_title(url), _clean(text), {})


def markdown_page(markdown: str, url: str, title: str | None = None) -> Page:
    """A Markdown document as written, its inline links as marks and images as `[Image n: alt]`; the title is the
    first `# ` heading unless given."""
    marks, images = LinkMarks(url), 0

    def replace(match: re.Match) -> str:
        nonlocal images
        bang, text, href = match.groups()
        if bang:
            images += 1
            return f"[Image {images - 1}: {text}]" if text else f"[Image {images - 1}]"
        target = _link_target(url, href)
        return marks.mark(target, merged(text)) if target and text.strip() else text

    text = _MARKDOWN_LINK.sub(replace, _clean(markdown))
    heading = re.search(r"^# +(.+)$", text, re.MULTILINE)
    found_title = strip_links(heading.group(1)).strip() if heading else ""
    return _page(url, title or found_title or _default_title(url), text, marks.links)


def html_page(html: str, url: str, title: str | None = None) -> Page:
    """An HTML document as Markdown-like text, as the reference draws it (by html2text): `#` headings, `  * ` and
    `  1. ` list items, `> ` quotes, paragraphs apart, table cells on one line per row, <pre> indented by four; links
    as marks, images as `[Image n: alt]`, <sup>/<sub> as ^{…}/_{…}; scripts, styles and math left out, and no
    emphasis marks. The title is <title> unless given."""
    soup = bs4.BeautifulSoup(_clean(html), "html.parser")
    found_title = merged(soup.title.get_text()) if soup.title else ""
    for node in soup.find_all(["script", "style", "head", "template", "math"]):
        node.decompose()
    marks = LinkMarks(url)
    for anchor in soup.find_all("a", href=True):
        text, target = merged(anchor.get_text(" ")), _link_target(url, anchor["href"])
        if text and target:
            anchor.replace_with(marks.mark(target, text))
    for index, image in enumerate(soup.find_all("img")):
        name = image.get("alt") or image.get("title")
        image.replace_with(f"[Image {index}: {name}]" if name else f"[Image {index}]")
    for node in soup.find_all(["sup", "sub"]):
        if re.fullmatch(r"[\w\-]+", node.get_text()):
            node.replace_with(("^{%s}" if node.name == "sup" else "_{%s}") % node.get_text())
    pieces: list[str] = []
    _render(soup, pieces, depth=0)
    lines = (re.sub(" +", " ", line).strip(" ").replace(_KEPT_SPACE, " ") for line in "".join(pieces).split("\n"))
    return _page(url, title or found_title or _default_title(url), "\n".join(lines), marks.links)


_BLOCKS = frozenset("address article aside dd details div dl dt fieldset figcaption figure footer form "
                    "header hr main nav p section summary table".split())
_HEADINGS = {f"h{level}": level for level in range(1, 7)}


def _render(node: bs4.Tag, pieces: list[str], depth: int) -> None:
    """Appends the text of `node`'s children: inline text with its whitespace merged, newlines around blocks."""
    for child in node.children:
        if isinstance(child, bs4.element.PreformattedString):  # comments, doctypes, CDATA
            continue
        if isinstance(child, bs4.NavigableString):
            pieces.append(re.sub(r"\s+", " ", str(child)))
        elif child.name == "br":
            pieces.append("\n")
        elif child.name in _HEADINGS:
            pieces.append("\n\n" + "#" * _HEADINGS[child.name] + " ")
            _render(child, pieces, depth)
            pieces.append("\n\n")
        elif child.name in ("ul", "ol"):
            pieces.append("\n\n" if depth == 0 else "")
            items = (item for item in child.children if isinstance(item, bs4.Tag) and item.name == "li")
            for number, item in enumerate(items, 1):
                bullet = f"{number}." if child.name == "ol" else "*"
                pieces.append("\n" + _KEPT_SPACE * 2 * (depth + 1) + bullet + " ")
                _render(item, pieces, depth + 1)
            pieces.append("\n\n" if depth == 0 else "\n")
        elif child.name == "pre":
            code = child.get_text().strip("\n").replace(" ", _KEPT_SPACE).split("\n")
            pieces.append("\n\n" + "\n".join(_KEPT_SPACE * 4 + line for line in code) + "\n\n")
        elif child.name == "blockquote":
            quoted: list[str] = []
            _render(child, quoted, depth)
            lines = "".join(quoted).strip().split("\n")
            pieces.append("\n\n" + "\n".join(f"> {line}" if line.strip() else line for line in lines) + "\n\n")
        elif child.name == "tr":
            _render(child, pieces, depth)
            pieces.append("\n")
        elif child.name in ("td", "th"):
            _render(child, pieces, depth)
            pieces.append(" ")
        elif child.name in _BLOCKS:
            pieces.append("\n\n")
            _render(child, pieces, depth)
            pieces.append("\n\n")
        else:
            _render(child, pieces, depth)
